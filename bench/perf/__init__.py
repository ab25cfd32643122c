"""Performance suites: ``python -m bench.perf SUITE --json FILE``.

Each suite races engine code against the plainest Trio code doing the same job,
every contender in a fresh interpreter, and reports ours / baseline ratios
measured in the same run (see :mod:`bench.perf.common` for the method).
"""
