"""Triage configuration: the msgspec schema, the TOML loader and the failure catalog.

The bottom layer: it imports nothing from ``actors``, ``supervisors`` or
``providers``, and from ``engine`` only the error tree (:mod:`engine.errors`:
``ConfigError`` and ``ConfigProblem`` are the engine's, so that one class is
raised and caught for every configuration problem). The shipped files (``default.toml``,
``dev.toml``, ``chaos.toml``, ``failures.toml``) live beside this module as
package data; :func:`default_path` finds them.
"""

from __future__ import annotations

from pathlib import Path

from config.catalog import (
    Catalog,
    CatalogRow,
    alert_rules,
    describe_detector,
    load_catalog,
    load_catalog_text,
    prometheus_expr,
    rules_yaml,
)
from config.loader import (
    ConfigError,
    ConfigProblem,
    catalog_path,
    load_config,
    load_config_text,
    located,
    source_files,
)
from config.schema import (
    BreakerConfig,
    BulkheadConfig,
    DaemonConfig,
    DatabaseConfig,
    DetectorConfig,
    GuardConfig,
    IdempotencyConfig,
    MailboxConfig,
    RateLimitConfig,
    RelayConfig,
    RetryConfig,
    ServicesConfig,
    SupervisorConfig,
    TriageConfig,
    engine_kwargs,
)

__all__ = [
    "SHIPPED_FILES",
    "BreakerConfig",
    "BulkheadConfig",
    "Catalog",
    "CatalogRow",
    "ConfigError",
    "ConfigProblem",
    "DaemonConfig",
    "DatabaseConfig",
    "DetectorConfig",
    "GuardConfig",
    "IdempotencyConfig",
    "MailboxConfig",
    "RateLimitConfig",
    "RelayConfig",
    "RetryConfig",
    "ServicesConfig",
    "SupervisorConfig",
    "TriageConfig",
    "alert_rules",
    "catalog_path",
    "default_path",
    "describe_detector",
    "engine_kwargs",
    "load_catalog",
    "load_catalog_text",
    "load_config",
    "load_config_text",
    "located",
    "prometheus_expr",
    "rules_yaml",
    "source_files",
]

#: The TOML files shipped as package data.
SHIPPED_FILES = ("default.toml", "dev.toml", "chaos.toml", "failures.toml")


def default_path(name: str = "default.toml") -> Path:
    """The path of a shipped file, e.g. ``default_path("chaos.toml")``."""
    if name not in SHIPPED_FILES:
        raise ValueError(f"no shipped config file {name!r}; shipped: {', '.join(SHIPPED_FILES)}")
    return Path(__file__).resolve().parent / name
