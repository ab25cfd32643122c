"""Chaos scenarios, one per catalog row: ``python -m bench.chaos [ID ...] --json FILE``."""
