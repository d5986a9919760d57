"""Unit tests, no database: the loop's pure decisions, the public value types, and name checks."""

from __future__ import annotations

import math
import string

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

import batchloop as bl
from batchloop.models import Config, Debounce, Idle
from batchloop.runtime import decide
from batchloop.runtime.decide import (
    RunAgain,
    Sleep,
    after_confirm,
    after_failure,
    after_idle,
    after_work,
)
from batchloop.schema_name import (
    DEFAULT_SCHEMA,
    channel,
    check_name,
    check_schema,
    quote_schema,
)

seconds = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
jitters = st.floats(min_value=0.0, max_value=1.0, exclude_max=True, allow_nan=False)


# --------------------------------------------------------------------------------------------
# after_work


def test_after_work_without_debounce_runs_again_at_once() -> None:
    assert after_work(None) == RunAgain(0.0, "work")


@pytest.mark.parametrize("delay", [0.0, 0.25, 30.0, 3600.0])
def test_after_work_with_debounce_waits_that_long(delay: float) -> None:
    decision = after_work(Debounce(delay))
    assert isinstance(decision, RunAgain)
    assert decision.delay == delay
    assert decision.reason == "debounce"


# --------------------------------------------------------------------------------------------
# after_idle


def test_after_idle_within_cooldown_polls_at_poll_interval() -> None:
    idle = Idle(cooldown=2.0, poll_interval=0.2)
    assert after_idle(idle, since_work=0.0) == RunAgain(0.2, "cooldown")
    assert after_idle(idle, since_work=1.999) == RunAgain(0.2, "cooldown")


def test_after_idle_cooldown_wins_over_any_timeout() -> None:
    # Even a long timeout or no timeout keeps polling while within the cooldown.
    assert after_idle(Idle(timeout=600.0, cooldown=5.0, poll_interval=0.5), 4.0) == RunAgain(
        0.5, "cooldown"
    )
    assert after_idle(Idle(timeout=None, cooldown=5.0, poll_interval=0.5), 4.0) == RunAgain(
        0.5, "cooldown"
    )


def test_after_idle_cooldown_ends_exactly_at_cooldown() -> None:
    assert after_idle(Idle(cooldown=2.0), since_work=2.0) == Sleep(None)


def test_after_idle_zero_cooldown_never_polls() -> None:
    assert after_idle(Idle(cooldown=0.0), since_work=0.0) == Sleep(None)


def test_after_idle_without_timeout_goes_idle() -> None:
    decision = after_idle(Idle(timeout=None, cooldown=2.0), since_work=10.0)
    assert decision == Sleep(None)
    assert isinstance(decision, Sleep) and decision.state == "idle"


@pytest.mark.parametrize("timeout", [0.01, 0.5, 0.999, 1.0])
def test_after_idle_short_timeout_stays_running(timeout: float) -> None:
    # t <= max(1 s, poll_interval) with the default 0.2 s poll interval: still "running".
    decision = after_idle(Idle(timeout=timeout, cooldown=0.0, poll_interval=0.2), since_work=5.0)
    # ... re-run after the timeout, but never faster than the poll interval (no spinning)
    assert decision == RunAgain(max(timeout, 0.2), "short timeout")


@pytest.mark.parametrize("timeout", [1.001, 2.0, 60.0, 86_400.0])
def test_after_idle_longer_timeout_sleeps_waiting(timeout: float) -> None:
    decision = after_idle(Idle(timeout=timeout, cooldown=0.0, poll_interval=0.2), since_work=5.0)
    assert decision == Sleep(timeout)
    assert isinstance(decision, Sleep) and decision.state == "waiting"


def test_after_idle_threshold_follows_a_long_poll_interval() -> None:
    # With poll_interval 5 s the running threshold is 5 s, not 1 s.
    idle_4 = Idle(timeout=4.0, cooldown=0.0, poll_interval=5.0)
    idle_5 = Idle(timeout=5.0, cooldown=0.0, poll_interval=5.0)
    idle_6 = Idle(timeout=5.5, cooldown=0.0, poll_interval=5.0)
    assert after_idle(idle_4, 1.0) == RunAgain(5.0, "short timeout")
    assert after_idle(idle_5, 1.0) == RunAgain(5.0, "short timeout")
    assert after_idle(idle_6, 1.0) == Sleep(5.5)


def test_running_threshold_is_one_second() -> None:
    assert decide.RUNNING_THRESHOLD == 1.0


@given(
    timeout=st.none() | seconds,
    cooldown=seconds,
    poll_interval=positive,
    since_work=seconds,
)
def test_after_idle_matches_the_contract(
    timeout: float | None, cooldown: float, poll_interval: float, since_work: float
) -> None:
    idle = Idle(timeout=timeout, cooldown=cooldown, poll_interval=poll_interval)
    decision = after_idle(idle, since_work)
    if since_work < cooldown:
        assert decision == RunAgain(poll_interval, "cooldown")
    elif timeout is not None and timeout <= max(1.0, poll_interval):
        assert decision == RunAgain(max(timeout, poll_interval), "short timeout")
    else:
        assert decision == Sleep(timeout)
        assert isinstance(decision, Sleep)
        assert decision.state == ("idle" if timeout is None else "waiting")


# --------------------------------------------------------------------------------------------
# after_failure


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999999])
def test_first_retry_comes_within_a_second(jitter: float) -> None:
    decision = after_failure(1, cap=60.0, jitter=jitter)
    assert decision.reason == "retry"
    assert 0.0 < decision.delay <= 1.0
    assert 0.25 <= decision.delay <= 0.5


def test_backoff_doubles_until_the_cap() -> None:
    delays = [after_failure(n, cap=60.0, jitter=0.0).delay for n in range(1, 12)]
    # jitter 0 gives half the base: 0.25, 0.5, 1, 2, 4, 8, 16, then capped base 60 -> 30.
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_backoff_is_capped_even_for_huge_failure_counts() -> None:
    for failures in (20, 61, 62, 1_000, 10**9):
        delay = after_failure(failures, cap=60.0, jitter=0.999999).delay
        assert 30.0 <= delay <= 60.0
        assert math.isfinite(delay)


def test_cap_below_first_retry_still_caps() -> None:
    assert after_failure(1, cap=0.1, jitter=0.999999).delay <= 0.1


@given(failures=st.integers(min_value=1, max_value=10_000), cap=positive, jitter=jitters)
def test_backoff_jitter_bounds(failures: int, cap: float, jitter: float) -> None:
    base = min(cap, decide.FIRST_RETRY * 2.0 ** min(failures - 1, 60))
    delay = after_failure(failures, cap=cap, jitter=jitter).delay
    assert base / 2 <= delay <= base
    assert delay <= cap


@given(failures=st.integers(min_value=1, max_value=200), cap=positive, jitter=jitters)
def test_backoff_is_monotonic_in_failures(failures: int, cap: float, jitter: float) -> None:
    assert (
        after_failure(failures, cap, jitter).delay <= after_failure(failures + 1, cap, jitter).delay
    )


@pytest.mark.parametrize("failures", [0, -1, -100])
def test_failures_below_one_raise(failures: int) -> None:
    with pytest.raises(ValueError):
        after_failure(failures, cap=60.0, jitter=0.5)


@pytest.mark.parametrize("jitter", [-0.01, 1.0, 1.5, math.nan, math.inf, -math.inf])
def test_jitter_outside_unit_interval_raises(jitter: float) -> None:
    with pytest.raises(ValueError):
        after_failure(1, cap=60.0, jitter=jitter)


# --------------------------------------------------------------------------------------------
# after_confirm


def test_after_confirm_without_work_and_timeout_goes_idle() -> None:
    decision = after_confirm(Idle())
    assert decision == Sleep(None)
    assert isinstance(decision, Sleep) and decision.state == "idle"


def test_after_confirm_without_work_with_timeout_waits() -> None:
    decision = after_confirm(Idle(timeout=30.0))
    assert decision == Sleep(30.0)
    assert isinstance(decision, Sleep) and decision.state == "waiting"


def test_decisions_are_immutable() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        RunAgain(1.0, "x").delay = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Sleep(None).timeout = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# models: Config, Idle, Debounce, Work


def test_config_defaults() -> None:
    config = Config()
    assert config.debounce == 0.0
    assert config.monitor_lag == 60.0
    assert config.iteration_timeout is None
    assert bl.Config is Config


def test_config_accepts_valid_values() -> None:
    config = Config(debounce=0.1, monitor_lag=10.0, iteration_timeout=5.0)
    assert (config.debounce, config.monitor_lag, config.iteration_timeout) == (0.1, 10.0, 5.0)


def test_config_monitor_lag_minimum_is_at_most_ten_seconds() -> None:
    assert Config(monitor_lag=10.0).monitor_lag == 10.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"debounce": -0.001},
        {"debounce": -1.0},
        {"debounce": math.nan},
        {"debounce": math.inf},
        {"monitor_lag": -1.0},
        {"monitor_lag": 0.0},
        {"monitor_lag": math.nan},
        {"monitor_lag": math.inf},
        {"iteration_timeout": 0.0},
        {"iteration_timeout": -1.0},
        {"iteration_timeout": math.nan},
        {"iteration_timeout": math.inf},
        {"debounce": "soon"},
        {"bogus": 1},
        {"Debounce": 1.0},
    ],
)
def test_config_rejects_invalid_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Config(**kwargs)  # type: ignore[arg-type]


def test_config_rejects_unknown_keys_when_validating_stored_data() -> None:
    with pytest.raises(pydantic.ValidationError):
        Config.model_validate({"debounce": 0.1, "monitor_lag": 30.0, "extra": True})


def test_config_round_trips_and_compares_by_value() -> None:
    config = Config(debounce=0.5, monitor_lag=15.0, iteration_timeout=2.0)
    again = Config.model_validate(config.model_dump())
    assert again == config
    assert Config.model_validate_json(config.model_dump_json()) == config
    assert Config(debounce=0.5) != Config(debounce=0.25)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(pydantic.ValidationError):
        config.debounce = 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": -1.0},
        {"timeout": math.nan},
        {"cooldown": -0.1},
        {"cooldown": math.nan},
        {"poll_interval": 0.0},
        {"poll_interval": -0.2},
        {"poll_interval": math.nan},
    ],
)
def test_idle_rejects_negative_or_nan(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Idle(**kwargs)


def test_idle_defaults_and_valid_values() -> None:
    idle = Idle()
    assert (idle.timeout, idle.cooldown, idle.poll_interval) == (None, 2.0, 0.2)
    assert Idle(timeout=0.0, cooldown=0.0, poll_interval=0.01).timeout == 0.0


@pytest.mark.parametrize("value", [-0.001, -5.0, math.nan])
def test_debounce_rejects_negative_or_nan(value: float) -> None:
    with pytest.raises(ValueError):
        Debounce(value)


def test_debounce_accepts_zero_and_positive() -> None:
    assert Debounce(0.0).seconds == 0.0
    assert Debounce(30.0).seconds == 30.0


def test_work_carries_its_batch() -> None:
    assert bl.Work([1, 2, 3]).batch == [1, 2, 3]


# --------------------------------------------------------------------------------------------
# schema_name: worker names and schema names


@pytest.mark.parametrize("name", ["a", "events", "x" * 200, "é" * 200, "with spaces/and:colons"])
def test_check_name_accepts_one_to_two_hundred_characters(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 201, "é" * 201, None, 5, b"events", ["events"]])
def test_check_name_rejects_everything_else(name: object) -> None:
    with pytest.raises(ValueError):
        check_name(name)


@given(st.text(max_size=300))
def test_check_name_length_rule(name: str) -> None:
    # NUL is the one character PostgreSQL text cannot hold (test_inputs.py covers it).
    if 1 <= len(name) <= 200 and "\x00" not in name:
        assert check_name(name) == name
    else:
        with pytest.raises(ValueError):
            check_name(name)


@pytest.mark.parametrize("schema", ["batchloop", "_private", "Queue_2", "a", "s" * 50])
def test_check_schema_accepts_identifiers(schema: str) -> None:
    assert check_schema(schema) == schema
    assert quote_schema(schema) == f'"{schema}"'


@pytest.mark.parametrize(
    "schema",
    [
        "",
        "1abc",
        "a b",
        "a-b",
        "a.b",
        "public.x",
        'x"; DROP SCHEMA public CASCADE; --',
        'a"b',
        "a'b",
        "a;b",
        "a--",
        "s" * 51,
        "ünïcode",
        "a\x00b",
        "\tbatchloop",
        None,
        42,
    ],
)
def test_check_schema_rejects_non_identifiers(schema: object) -> None:
    with pytest.raises(ValueError):
        check_schema(schema)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        quote_schema(schema)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        channel(schema)  # type: ignore[arg-type]


@pytest.mark.parametrize("schema", ["batchloop\n", "a\n"])
def test_check_schema_rejects_a_trailing_newline(schema: str) -> None:
    with pytest.raises(ValueError):
        check_schema(schema)


@given(st.text(max_size=80))
def test_check_schema_accepts_only_safe_ascii_identifiers(schema: str) -> None:
    safe = set(string.ascii_letters + string.digits + "_")
    valid = 1 <= len(schema) <= 50 and set(schema) <= safe and not schema[0].isdigit()
    if valid:
        assert check_schema(schema) == schema
        assert quote_schema(schema) == f'"{schema}"'
    else:
        with pytest.raises(ValueError):
            check_schema(schema)


def test_default_schema_and_channel() -> None:
    assert DEFAULT_SCHEMA == "batchloop"
    assert check_schema(DEFAULT_SCHEMA) == "batchloop"
    assert channel("batchloop") == "batchloop:batchloop"
    # the longest valid schema still gives a channel within PostgreSQL's 63-byte identifiers
    assert len(channel("s" * 50).encode()) <= 63


def test_claim_delay_holds_back_only_a_host_over_its_share() -> None:
    assert decide.claim_delay(0, 2, 500) == 0.0  # nothing yet: claim at once
    assert decide.claim_delay(900, 0, 0) == 0.0  # alone
    assert decide.claim_delay(100, 2, 200) == 0.0  # even
    assert decide.claim_delay(104, 2, 200) == 0.0  # within the slack
    small = decide.claim_delay(130, 2, 200)
    large = decide.claim_delay(400, 2, 200)
    assert 0 < small < large <= decide.CLAIM_DEFER_MAX
    assert decide.claim_delay(10**6, 2, 0) == decide.CLAIM_DEFER_MAX


def test_lock_first_only_when_the_last_idle_would_sleep_now() -> None:
    assert not decide.lock_first(None, 1e9)  # no poll yet: nothing to go by
    assert decide.lock_first(Idle(cooldown=2.0), 2.0)  # the cooldown ends exactly now
    assert not decide.lock_first(Idle(cooldown=2.0), 1.99)
    assert decide.lock_first(Idle(timeout=30.0, cooldown=0.0), 0.0)  # waiting counts as sleep
    # a short timeout keeps the worker running (after_idle never says Sleep): no lock
    assert not decide.lock_first(Idle(timeout=0.5, cooldown=0.0), 10.0)


def test_decide_doctests() -> None:
    import doctest

    result = doctest.testmod(decide)
    assert result.attempted >= 5 and result.failed == 0
