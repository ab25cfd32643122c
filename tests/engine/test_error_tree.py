"""The one error tree: every exception raised on purpose is a TriageError, drawn once."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import config
import engine.errors
from engine.errors import ConfigError, ConfigProblem, TriageError

PACKAGES = ("engine", "actors", "supervisors", "providers", "config")
#: Exceptions allowed outside the tree (none: every one is rooted).
PENDING: set[str] = set()


def _exceptions() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules = [package] + [
            importlib.import_module(info.name)
            for info in pkgutil.walk_packages(package.__path__, f"{name}.")
        ]
        for module in modules:
            for value in vars(module).values():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == module.__name__
                    and not value.__name__.startswith("_")  # a module's private signal
                ):
                    found.append(value)
    return found


def test_every_public_exception_is_rooted_in_triage_error() -> None:
    unrooted = {
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in _exceptions()
        if not issubclass(cls, TriageError)
    }
    assert unrooted <= PENDING


def test_the_docstring_draws_every_class_of_the_tree() -> None:
    doc = engine.errors.__doc__ or ""
    names = {cls.__name__ for cls in _exceptions() if issubclass(cls, TriageError)}
    missing = sorted(n for n in names - {"TriageError"} if f"─ {n}" not in doc)
    assert missing == []
    for drawn in ("InvalidRequest", "CategoryDisabled", "PhiRefused", "Overloaded",
                  "IdempotencyConflict", "RequestRejected"):  # fmt: skip
        assert f"─ {drawn}" in doc


def test_value_error_stays_a_base_where_callers_catch_it() -> None:
    from providers.db.categories import CategoryError
    from providers.receipts import ReceiptError

    for cls in (ConfigError, ReceiptError, CategoryError):
        assert issubclass(cls, TriageError) and issubclass(cls, ValueError)


def test_one_config_error() -> None:
    assert config.ConfigError is ConfigError
    assert config.ConfigProblem is ConfigProblem
    with pytest.raises(ConfigError):  # the loader's and the engine's are one class
        config.load_config_text("[daemon\n")


def test_an_engine_config_error_is_placed_by_who_knows_the_path() -> None:
    bare = ConfigError("detector 'x': window_s must be > 0")
    assert str(bare) == "detector 'x': window_s must be > 0"
    placed = bare.at("x.toml", "$.detectors.x")
    assert [str(p) for p in placed.problems] == [
        "x.toml: $.detectors.x: detector 'x': window_s must be > 0"
    ]
    # A problem that names its file already keeps its place.
    known = ConfigProblem(source="a.toml", line=3, path="$.daemon.port", message="bad")
    assert ConfigError([known]).at("x.toml", "$").problems == (known,)
    with pytest.raises(ConfigError) as info, config.located("y.toml", "$.bounces"):
        raise bare
    assert str(info.value) == "y.toml: $.bounces: detector 'x': window_s must be > 0"
    assert info.value.__cause__ is bare
