"""The loader: profile inheritance, error paths with line numbers, collected errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, ConfigProblem, catalog_path, load_config, load_config_text

DAEMON = """\
[daemon]
drain_s = 25
max_label_values = 100
detector_tick_s = 1
drain_grace_s = 0.0
"""

BREAKERS = """
[breakers.default]
fail_max = 5
reset_timeout_s = 30
reset_timeout_max_s = 300
reset_backoff_multiplier = 2
failure_rate_threshold = 0.5
rate_window_s = 60
minimum_calls = 20
slow_call_s = 5
slow_call_rate_threshold = 0.8
half_open_max_calls = 1
"""

POLICIES = """
[bulkheads.default]
capacity = 10
max_wait_s = 0.5
max_partitions = 100
partition_capacity = 5

[retries.default]
max_attempts = 3
time_budget_s = 10
backoff_initial_s = 0.1
backoff_max_s = 2
backoff_multiplier = 2
jitter = 0.5
"""


def errors(text: str, source: str = "test.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def where(text: str, needle: str, source: str = "test.toml") -> str:
    """``source:LINE`` of the only line that is exactly ``needle``."""
    return f"{source}:{line_of(text, needle)}"


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line that is exactly ``needle``."""
    lines = text.splitlines()
    assert lines.count(needle) == 1, needle
    return lines.index(needle) + 1


def test_minimal_file_loads() -> None:
    config = load_config_text(DAEMON)
    assert config.daemon.drain_s == 25.0
    assert config.breakers == {}


def test_profile_inherits_and_overrides() -> None:
    text = DAEMON + BREAKERS + '\n[breakers.sms_primary]\nbase = "default"\nfail_max = 3\n'
    config = load_config_text(text)
    primary = config.breakers["sms_primary"]
    assert primary.fail_max == 3
    assert primary.base == "default"
    assert primary.reset_timeout_s == 30.0
    assert config.breakers["default"].fail_max == 5
    assert config.breakers["default"].base is None


def test_inheritance_chain_in_any_order() -> None:
    # The child is written before its base, and the chain is three deep.
    text = (
        DAEMON
        + '\n[breakers.c]\nbase = "b"\nslow_call_s = 9\n'
        + BREAKERS
        + '\n[breakers.b]\nbase = "default"\nfail_max = 2\nslow_call_s = 7\n'
    )
    c = load_config_text(text).breakers["c"]
    assert (c.base, c.fail_max, c.slow_call_s, c.minimum_calls) == ("b", 2, 9.0, 20)


def test_inheritance_works_in_every_profile_section() -> None:
    text = (
        DAEMON
        + """
[mailboxes.default]
capacity = 100
overflow = "reject"
[mailboxes.relay]
base = "default"
overflow = "wait"
[guards.default]
breaker = "default"
bulkhead = "default"
retry = "default"
timeout_s = 5
[guards.sms]
base = "default"
timeout_s = 2
"""
        + BREAKERS
        + POLICIES
    )
    config = load_config_text(text)
    assert config.mailboxes["relay"].capacity == 100
    assert config.mailboxes["relay"].overflow == "wait"
    assert config.guards["sms"].breaker == "default"
    assert config.guards["sms"].timeout_s == 2.0


def test_inheritance_cycle_is_refused() -> None:
    text = DAEMON + '\n[breakers.a]\nbase = "b"\n\n[breakers.b]\nbase = "a"\n'
    problems = errors(text)
    assert problems == [
        where(text, 'base = "a"') + ": $.breakers.b.base: inheritance cycle: a -> b -> a"
    ]


def test_self_inheritance_is_a_cycle() -> None:
    text = DAEMON + BREAKERS.replace("fail_max = 5", 'base = "default"\nfail_max = 5')
    assert errors(text) == [
        where(text, 'base = "default"') + ": $.breakers.default.base: "
        "inheritance cycle: default -> default"
    ]


def test_unknown_base_is_refused() -> None:
    text = DAEMON + BREAKERS + '\n[breakers.sms]\nbase = "defualt"\n'
    (problem,) = errors(text)
    assert problem.startswith(
        where(text, 'base = "defualt"') + ": $.breakers.sms.base: "
        'unknown profile "defualt" in [breakers]'
    )


def test_out_of_range_names_the_profile_and_the_line() -> None:
    text = DAEMON + BREAKERS + '\n[breakers.sms_primary]\nbase = "default"\nfail_max = 0\n'
    assert errors(text, "default.toml") == [
        where(text, "fail_max = 0", "default.toml") + ": "
        "$.breakers.sms_primary.fail_max: expected int >= 1, got 0"
    ]


def test_error_in_a_base_is_reported_once_where_it_is_written() -> None:
    text = (
        DAEMON
        + BREAKERS.replace("slow_call_s = 5", "slow_call_s = -1")
        + '\n[breakers.sms]\nbase = "default"\n'
    )
    assert errors(text) == [
        where(text, "slow_call_s = -1") + ": "
        "$.breakers.default.slow_call_s: expected float > 0.0, got -1"
    ]


def test_inherited_value_failing_a_child_rule_points_at_the_base() -> None:
    # The child's own reset_timeout_s makes the inherited cap too small.
    text = DAEMON + BREAKERS + '\n[breakers.slow]\nbase = "default"\nreset_timeout_s = 600\n'
    assert errors(text) == [
        where(text, "reset_timeout_max_s = 300") + ": "
        "$.breakers.slow.reset_timeout_max_s: must be >= reset_timeout_s (600), got 300 "
        "(inherited from [breakers.default])"
    ]


def test_unknown_key_is_refused_with_its_path() -> None:
    text = DAEMON + BREAKERS.replace("fail_max = 5", "fail_max = 5\nfail_maxx = 3")
    assert errors(text) == [
        where(text, "fail_maxx = 3") + ": $.breakers.default.fail_maxx: unknown key"
    ]


def test_unknown_keys_everywhere() -> None:
    text = "colour = 1\n" + DAEMON + "verbose = true\n[services]\nkafka_url = 'x'\n"
    assert errors(text) == [
        "test.toml:1: $.colour: unknown key",
        where(text, "verbose = true") + ": $.daemon.verbose: unknown key",
        where(text, "kafka_url = 'x'") + ": $.services.kafka_url: unknown key",
    ]


def test_unknown_key_and_a_bad_value_in_one_profile_are_both_reported() -> None:
    text = DAEMON + BREAKERS.replace("fail_max = 5", "fail_max = 0\ntypo = 1")
    assert errors(text) == [
        where(text, "fail_max = 0") + ": $.breakers.default.fail_max: expected int >= 1, got 0",
        where(text, "typo = 1") + ": $.breakers.default.typo: unknown key",
    ]


def test_several_problems_are_collected() -> None:
    text = (
        DAEMON.replace("drain_s = 25", "drain_s = 0")
        + BREAKERS
        + '\n[breakers.a]\nbase = "default"\nfail_max = 0\n'
        + '\n[breakers.b]\nbase = "default"\nhalf_open_max_calls = "two"\n'
        + '\n[mailboxes.m]\ncapacity = 1\noverflow = "drop_oldest"\n'
    )
    assert errors(text) == [
        "test.toml:2: $.daemon.drain_s: expected float > 0.0, got 0",
        where(text, "fail_max = 0") + ": $.breakers.a.fail_max: expected int >= 1, got 0",
        where(text, 'half_open_max_calls = "two"') + ": "
        '$.breakers.b.half_open_max_calls: expected int, got "two"',
        where(text, 'overflow = "drop_oldest"') + ": $.mailboxes.m.overflow: "
        'expected one of "drop_newest", "reject", "wait", got "drop_oldest"',
    ]


def test_missing_required_key_points_at_the_table() -> None:
    text = DAEMON + '\n[mailboxes.relay]\noverflow = "wait"\n'
    assert errors(text) == [
        where(text, "[mailboxes.relay]") + ": $.mailboxes.relay.capacity: missing required key"
    ]


def test_missing_daemon_section() -> None:
    assert errors("") == ["test.toml: $.daemon: missing required section [daemon]"]


def test_section_that_is_not_a_table() -> None:
    assert errors("breakers = 3\n" + DAEMON) == [
        "test.toml:1: $.breakers: expected a table of named profiles, got 3"
    ]
    assert errors(DAEMON + "[breakers]\nsms = 3\n") == [
        "test.toml:7: $.breakers.sms: expected a table, got 3"
    ]


def test_inline_and_dotted_profiles_get_line_numbers() -> None:
    text = DAEMON + '[mailboxes]\nrelay = { capacity = 0, overflow = "wait" }\n'
    assert errors(text) == ["test.toml:7: $.mailboxes.relay.capacity: expected int >= 1, got 0"]
    text = DAEMON + "[mailboxes]\nrelay.capacity = 0\nrelay.overflow = 'wait'\n"
    assert errors(text) == ["test.toml:7: $.mailboxes.relay.capacity: expected int >= 1, got 0"]


def test_keys_inside_multiline_strings_are_not_mistaken_for_settings() -> None:
    text = DAEMON + '[services]\npostgres_url = """\nfail_max = 0\n"""\nnats_url = 5\n'
    assert errors(text) == [
        where(text, "nats_url = 5") + ": $.services.nats_url: expected str | null, got 5"
    ]


def test_malformed_toml_gives_line_and_column() -> None:
    assert errors(DAEMON + "[breakers.sms\nfail_max = 1\n") == [
        "test.toml:6:14: $: malformed TOML: expected ']' at the end of a table declaration"
    ]
    assert errors("[daemon]\ndrain_s = \n") == ["test.toml:2:11: $: malformed TOML: invalid value"]
    assert errors("[daemon]\n[daemon]\n")[0].startswith("test.toml:2:")


def test_guard_referencing_missing_profiles() -> None:
    text = (
        DAEMON
        + BREAKERS
        + POLICIES
        + '\n[guards.sms]\nbreaker = "sms_primary"\nbulkhead = "default"\nretry = "default"\n'
        + 'timeout_s = 5\nrate_limit = "tenant"\n'
    )
    assert errors(text) == [
        where(text, 'breaker = "sms_primary"') + ": $.guards.sms.breaker: "
        'unknown breakers profile "sms_primary" (defined: default)',
        where(text, 'rate_limit = "tenant"') + ": $.guards.sms.rate_limit: "
        'unknown rate_limits profile "tenant" (defined: none)',
    ]


def test_guard_referencing_an_invalid_profile_only_reports_the_profile() -> None:
    text = (
        DAEMON
        + BREAKERS.replace("fail_max = 5", "fail_max = 0")
        + POLICIES
        + '\n[guards.sms]\nbreaker = "default"\nbulkhead = "default"\nretry = "default"\n'
        + "timeout_s = 5\n"
    )
    (problem,) = errors(text)
    assert "$.breakers.default.fail_max" in problem


def test_detector_hysteresis_error_path() -> None:
    text = (
        DAEMON
        + '[detectors.slo]\nkind = "ratio"\nmetric = "m_ratio"\nthreshold = 0.2\n'
        + "clear_threshold = 0.5\nwindow_s = 60\n"
    )
    assert errors(text) == [
        where(text, "clear_threshold = 0.5") + ": $.detectors.slo.clear_threshold: "
        "must be <= threshold (0.2) when op is 'gt', got 0.5"
    ]


def test_profile_names_that_need_quotes() -> None:
    text = DAEMON + '[mailboxes."sms.primary"]\ncapacity = 0\noverflow = "wait"\n'
    assert errors(text) == [
        'test.toml:7: $.mailboxes["sms.primary"].capacity: expected int >= 1, got 0'
    ]


def test_load_config_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "triage.toml"
    path.write_text('catalog = "catalogs/failures.toml"\n' + DAEMON)
    config = load_config(path)
    assert catalog_path(config, path) == tmp_path / "catalogs" / "failures.toml"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == (
        ConfigProblem(
            source=str(path),
            line=None,
            path="$",
            message="cannot read file: No such file or directory",
        ),
    )


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_drain_grace_must_fit_inside_the_drain_budget() -> None:
    text = DAEMON.replace("drain_grace_s = 0.0", "drain_grace_s = 25.0")
    problems = errors(text)
    assert len(problems) == 1
    assert "$.daemon" in problems[0]
    assert "drain_grace_s: must be below drain_s (25)" in problems[0]


def test_channel_sections_decode_with_their_defaults_and_refuse_bad_values() -> None:
    base = "[daemon]\ndrain_s = 5.0\nmax_label_values = 10\ndetector_tick_s = 1.0\n"
    config = load_config_text(base)
    assert config.channels.sms == ["ghasi", "twilio"]
    assert config.providers.ghasi.guard == "sms_primary"
    assert config.emulators.enabled is False
    bad = base + "[dlr]\nworkers_min = 9\nworkers_max = 4\n"
    with pytest.raises(ConfigError) as caught:
        load_config_text(bad, source="bad.toml")
    assert "$.dlr.workers_min: must be <= workers_max (4)" in str(caught.value)
    unknown = base + '[channels]\nsms = ["ghasi", "nexmo"]\n'
    with pytest.raises(ConfigError) as caught:
        load_config_text(unknown, source="bad.toml")
    assert "$.channels.sms[1]" in str(caught.value)
    typo = base + '[providers.ghasi]\nbase_ulr = "http://x"\n'
    with pytest.raises(ConfigError) as caught:
        load_config_text(typo, source="bad.toml")
    assert "base_ulr" in str(caught.value)


def test_every_ghasi_wire_name_comes_from_its_config_key() -> None:
    from providers.ghasi import GhasiWire
    from supervisors.emulated import ghasi_wire

    base = "[daemon]\ndrain_s = 5.0\nmax_label_values = 10\ndetector_tick_s = 1.0\n"
    text = base + '[providers.ghasi]\nto_field = "msisdn"\nsignature_header = "X-Sig"\n'
    wire = ghasi_wire(load_config_text(text))
    assert (wire.to_field, wire.signature_header) == ("msisdn", "X-Sig")
    # The defaults agree with the wire's own.
    assert ghasi_wire(load_config_text(base)) == GhasiWire()
