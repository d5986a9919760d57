"""Unit tests, no database: the NOTIFY payload codec (``w|s|r|c:<lock_key>:<name>``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batchloop.runtime.wakeups import Wakeup, decode, encode


def test_the_sql_functions_payload_decodes_to_its_kind_and_name() -> None:
    # what migrations/0001's ping, stop and start send: the lock key in the middle
    assert decode("w:-4611686018427387904:orders") == Wakeup("w", "orders")
    assert decode("s:17:orders") == Wakeup("s", "orders")


def test_a_name_with_colons_is_decoded_whole() -> None:
    assert decode("w:42:tenant:7:orders") == Wakeup("w", "tenant:7:orders")
    assert decode(encode("r", "a:b")) == Wakeup("r", "a:b")


def test_the_hosts_payload_keeps_the_three_fields_older_hosts_split() -> None:
    payload = encode("r", "orders")
    kind, _, rest = payload.partition(":")  # how every earlier release decoded it
    _key, _, name = rest.partition(":")
    assert (kind, name) == ("r", "orders")


def test_payloads_that_are_not_wakeups_are_ignored() -> None:
    for payload in ("", "w", "w:orders", "x:1:orders", "wake:1:orders"):
        assert decode(payload) is None, payload


@given(st.sampled_from(["w", "s", "r", "c"]), st.text(min_size=1))
def test_encode_and_decode_agree(kind: str, name: str) -> None:
    assert decode(encode(kind, name)) == Wakeup(kind, name)  # type: ignore[arg-type]
