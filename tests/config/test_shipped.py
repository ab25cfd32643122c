"""The shipped TOML files: each loads on its own, and they agree on profile names."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from config import (
    SHIPPED_FILES,
    ConfigError,
    TriageConfig,
    catalog_path,
    default_path,
    load_config,
    source_files,
)
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
    default = load_config(default_path("default.toml"))
    other = load_config(default_path(name))
    for section in PROFILE_SECTIONS:
        if section == "detectors" and name == "chaos.toml":
            # chaos.toml adds detectors that the scenarios hand to the actors they run
            # (outbox lag, cache hit ratio) with shortened windows; the daemon builds
            # those actors' detectors from their catalog rows.
            assert set(getattr(default, section)) <= set(getattr(other, section)), section
            continue
        assert set(getattr(other, section)) == set(getattr(default, section)), section


def _leaves(table: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in table.items():
        if isinstance(value, dict):
            out += _leaves(value, (*path, key))
        else:
            out.append((*path, key))
    return out


@pytest.mark.parametrize("name", ["dev.toml", "chaos.toml"])
def test_dev_and_chaos_are_overlays_holding_only_what_differs(name: str) -> None:
    default_raw = tomllib.loads(default_path("default.toml").read_text())
    raw = tomllib.loads(default_path(name).read_text())
    assert raw.pop("extends") == "default.toml"
    default = msgspec.to_builtins(load_config(default_path("default.toml")))
    merged = msgspec.to_builtins(load_config(default_path(name)))
    for path in _leaves(raw):
        written: Any = raw
        for key in path:
            written = written[key]
        effective: Any = merged
        for key in path:
            effective = effective[key]
        assert effective == written, path  # what the overlay writes is what runs
        # ... and it differs from default.toml: in the value written there, or in the
        # effective one (a profile that inherits a key default.toml's profile sets).
        base: Any = default
        for key in path:
            base = base.get(key) if isinstance(base, dict) else None
        below: Any = default_raw
        for key in path:
            below = below.get(key) if isinstance(below, dict) else None
        assert base != written or (below is not None and below != written), path


def test_an_overlay_problem_names_the_file_that_wrote_it(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text(default_path("default.toml").read_text())
    overlay = tmp_path / "site.toml"
    overlay.write_text('extends = "base.toml"\n\n[daemon]\nport = 99999\n')
    with pytest.raises(ConfigError) as info:
        load_config(overlay)
    assert [str(p) for p in info.value.problems] == [
        f"{overlay}:4: $.daemon.port: expected int <= 65535, got 99999"
    ]
    # Inherited: a base's value that the merge makes invalid is reported where written.
    overlay.write_text('extends = "base.toml"\n\n[breakers.default]\nreset_timeout_max_s = 1.0\n')
    with pytest.raises(ConfigError) as info:
        load_config(overlay)
    assert all(p.source in (str(overlay), str(tmp_path / "base.toml")) for p in info.value.problems)


def test_an_extends_cycle_or_missing_base_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="extends cycle"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "c.toml")


def test_the_files_a_load_reads_for_the_watch(tmp_path: Path) -> None:
    """source_files: the overlay, its chain nearest first, then the catalog (named by the
    nearest file that writes one, beside the top file); a broken chain stops quietly."""
    site = tmp_path / "site"
    site.mkdir()
    (tmp_path / "base.toml").write_text('catalog = "rows.toml"\n[daemon]\nport = 1\n')
    (site / "mid.toml").write_text('extends = "../base.toml"\n')
    (site / "top.toml").write_text('extends = "mid.toml"\n')
    assert source_files(site / "top.toml") == [
        site / "top.toml", site / "mid.toml", site / "../base.toml", site / "rows.toml",
    ]  # fmt: skip
    (site / "mid.toml").write_text('extends = "../base.toml"\ncatalog = "near.toml"\n')
    assert source_files(site / "top.toml")[-1] == site / "near.toml"
    # A cycle, a missing base, a file that is no TOML: the chain stops there.
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    assert source_files(tmp_path / "a.toml") == [
        tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "failures.toml",
    ]  # fmt: skip
    (tmp_path / "c.toml").write_text('extends = "nowhere.toml"\n')
    assert source_files(tmp_path / "c.toml") == [
        tmp_path / "c.toml", tmp_path / "nowhere.toml", tmp_path / "failures.toml",
    ]  # fmt: skip
    (tmp_path / "d.toml").write_text("extends = [\n")
    assert source_files(tmp_path / "d.toml") == [tmp_path / "d.toml", tmp_path / "failures.toml"]
    # The shipped dev.toml: itself, default.toml, and the catalog beside them.
    assert source_files(default_path("dev.toml")) == [
        default_path("dev.toml"), default_path("default.toml"), default_path("failures.toml"),
    ]  # fmt: skip


def test_default_path() -> None:
    for name in SHIPPED_FILES:
        assert default_path(name).is_file()
    assert default_path() == default_path("default.toml")
    with pytest.raises(ValueError, match="no shipped config file"):
        default_path("prod.toml")
