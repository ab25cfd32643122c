"""The registry of implemented chaos scenarios, by catalog row id.

A later issue adds a row's scenario here when it builds the row's actor; the
harness reports every other row as "not implemented yet", naming the issue.
"""

from __future__ import annotations

from bench.chaos.harness import Scenario

SCENARIOS: dict[int, Scenario] = {}
