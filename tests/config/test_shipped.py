"""The shipped TOML files: each loads on its own, and they agree on profile names."""

from __future__ import annotations

import tomllib

import pytest

from config import SHIPPED_FILES, TriageConfig, catalog_path, default_path, load_config
from config.loader import PROFILE_SECTIONS

CONFIGS = ("default.toml", "dev.toml", "chaos.toml")
PROVIDER_BREAKERS = (
    "sms_primary",
    "sms_secondary",
    "fcm",
    "apns",
    "smtp",
    "nats_publish",
    "postgres_primary",
    "postgres_replica",
    "redis",
    "clamd",
    "jitsi",
)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_loads(name: str) -> None:
    config = load_config(default_path(name))
    assert isinstance(config, TriageConfig)
    assert catalog_path(config, default_path(name)) == default_path("failures.toml")


def test_default_values() -> None:
    config = load_config(default_path("default.toml"))
    assert (config.daemon.host, config.daemon.port, config.daemon.drain_s) == (
        "127.0.0.1",
        8080,
        25.0,
    )
    assert set(PROVIDER_BREAKERS) <= set(config.breakers)
    assert "default" in config.breakers
    assert "root" in config.supervisors
    assert config.breakers["sms_primary"].base == "default"
    assert config.breakers["sms_primary"].failure_rate_threshold == 0.2
    # Every guard's names resolve (the loader checks it; this reads like the daemon will).
    for guard in config.guards.values():
        assert guard.breaker in config.breakers
        assert guard.bulkhead in config.bulkheads
        assert guard.retry in config.retries
        assert guard.rate_limit is None or guard.rate_limit in config.rate_limits
    assert config.services.postgres_url is None  # embedded by default


def test_dev_and_chaos_values() -> None:
    dev = load_config(default_path("dev.toml"))
    assert dev.daemon.port == 8080
    assert dev.daemon.log_level == "debug"
    chaos = load_config(default_path("chaos.toml"))
    assert chaos.daemon.port == 0
    assert chaos.breakers["default"].reset_timeout_s < 1
    assert chaos.supervisors["default"].period_s <= 5


@pytest.mark.parametrize("name", ["dev.toml", "chaos.toml"])
def test_profile_names_match_default(name: str) -> None:
    default = tomllib.loads(default_path("default.toml").read_text())
    other = tomllib.loads(default_path(name).read_text())
    for section in PROFILE_SECTIONS:
        if section == "detectors" and name == "chaos.toml":
            # chaos.toml adds detectors that the scenarios hand to the actors they run
            # (outbox lag, cache hit ratio) with shortened windows; the daemon builds
            # those actors' detectors from their catalog rows.
            assert set(default.get(section, {})) <= set(other.get(section, {})), section
            continue
        assert set(other.get(section, {})) == set(default.get(section, {})), section


def test_default_path() -> None:
    for name in SHIPPED_FILES:
        assert default_path(name).is_file()
    assert default_path() == default_path("default.toml")
    with pytest.raises(ValueError, match="no shipped config file"):
        default_path("prod.toml")
