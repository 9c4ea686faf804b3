"""The shape rules of a tracked event, checked by the ingestion pipeline for the batch
RPCs (services/ingestion/shape.py, `convert.incoming_events(shape_violations=...)`)
instead of protovalidate at the edge: every `buf.validate` rule declared on
`TrackedEvent` and its sub-messages has a case here, and for every case and for random
events the pipeline's check reports exactly what protovalidate reports (field paths,
descriptions, order). Over gRPC: tests/integration/test_event_shape_rules.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.type.v1 import tracked_event_pb2 as te
from buf.validate import validate_pb2
from google.protobuf.descriptor import Descriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingestion import convert, shape
from services.platform import validation
from services.platform.errors import FieldViolation
from services.platform.grpc_edge import ITEMS_VALIDATED_BY_SERVICER, _item_count_violations

_MESSAGE_RULES: Any = validate_pb2.DESCRIPTOR.extensions_by_name["message"]
_FIELD_RULES: Any = validate_pb2.DESCRIPTOR.extensions_by_name["field"]

Mutation = Callable[[te.TrackedEvent], None]


def _set(path: str, value: object) -> Mutation:
    def mutate(event: te.TrackedEvent) -> None:
        *parents, name = path.split(".")
        target: Any = event
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)

    return mutate


def _no_identity(event: te.TrackedEvent) -> None:
    event.user_id = ""
    event.anonymous_id = ""


# Every rule declared on the event (as found by `_declared_rules`): a change that breaks
# it, and the path of the first violation protovalidate reports, relative to the event.
RULE_CASES: dict[tuple[str, str], tuple[Mutation, str]] = {
    ("", "cel:tracked_event.identity"): (_no_identity, ""),
    ("event_id", "string.max_len"): (_set("event_id", "e" * 65), ".event_id"),
    ("event_id", "string.pattern"): (_set("event_id", "bad id"), ".event_id"),
    ("event_type", "enum.defined_only"): (_set("event_type", 99), ".event_type"),
    ("event_name", "string.min_len"): (_set("event_name", ""), ".event_name"),
    ("event_name", "string.max_len"): (_set("event_name", "n" * 129), ".event_name"),
    ("event_name", "string.pattern"): (_set("event_name", "Ticket_viewed"), ".event_name"),
    ("session_id", "string.max_len"): (_set("session_id", "s" * 129), ".session_id"),
    ("user_id", "string.max_len"): (_set("user_id", "u" * 129), ".user_id"),
    ("anonymous_id", "string.max_len"): (_set("anonymous_id", "a" * 129), ".anonymous_id"),
    ("page.url", "string.max_len"): (_set("page.url", "u" * 2049), ".page.url"),
    ("page.title", "string.max_len"): (_set("page.title", "t" * 513), ".page.title"),
    ("page.referrer", "string.max_len"): (_set("page.referrer", "r" * 2049), ".page.referrer"),
    ("ticketing.ticketed_event_id", "string.max_len"): (
        _set("ticketing.ticketed_event_id", "c" * 65),
        ".ticketing.ticketed_event_id",
    ),
    ("ticketing.campaign_id", "string.max_len"): (
        _set("ticketing.campaign_id", "c" * 65),
        ".ticketing.campaign_id",
    ),
    ("ticketing.order_id", "string.max_len"): (
        _set("ticketing.order_id", "o" * 65),
        ".ticketing.order_id",
    ),
    ("ticketing.quantity", "int32.gte"): (_set("ticketing.quantity", -1), ".ticketing.quantity"),
    ("ticketing.quantity", "int32.lte"): (
        _set("ticketing.quantity", 10001),
        ".ticketing.quantity",
    ),
    ("client.source", "enum.defined_only"): (_set("client.source", 17), ".client.source"),
    ("client.user_agent", "string.max_len"): (
        _set("client.user_agent", "m" * 1025),
        ".client.user_agent",
    ),
    ("client.ip_address", "string.max_len"): (
        _set("client.ip_address", "1" * 46),
        ".client.ip_address",
    ),
    ("client.ip_address", "string.pattern"): (
        _set("client.ip_address", "10.0.0.1\n"),
        ".client.ip_address",
    ),
    ("client.locale", "string.max_len"): (_set("client.locale", "l" * 36), ".client.locale"),
    ("definition_version", "int32.gte"): (_set("definition_version", -1), ".definition_version"),
}


def _declared_rules(
    descriptor: Descriptor, prefix: str = "", seen: set[str] | None = None
) -> set[tuple[str, str]]:
    """(field path, rule) of every buf.validate rule on `descriptor` and, recursively,
    on the messages its fields hold (well-known types included)."""
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    found: set[tuple[str, str]] = set()
    message_rules: Any = descriptor.GetOptions().Extensions[_MESSAGE_RULES]
    for name, value in message_rules.ListFields():
        if name.name == "cel":
            found |= {(prefix.rstrip("."), f"cel:{rule.id}") for rule in value}
        else:
            found.add((prefix.rstrip("."), f"message.{name.name}"))
    for oneof in descriptor.oneofs:
        if oneof.GetOptions().ListFields():
            found.add((prefix + oneof.name, "oneof"))
    for field in descriptor.fields:
        path = prefix + field.name
        rules: Any = field.GetOptions().Extensions[_FIELD_RULES]
        for kind, value in rules.ListFields():
            if kind.message_type is not None and not kind.is_repeated:
                found |= {(path, f"{kind.name}.{rule.name}") for rule, _ in value.ListFields()}
            elif kind.name == "cel":
                found |= {(path, f"cel:{rule.id}") for rule in value}
            else:
                found.add((path, kind.name))
        if field.message_type is not None:
            found |= _declared_rules(field.message_type, path + ".", seen)
    return found


def _valid_event() -> te.TrackedEvent:
    event = te.TrackedEvent(
        event_type=te.TRACKED_EVENT_TYPE_TRACK, event_name="ticket_viewed", user_id="u1"
    )
    event.client.ip_address = "81.2.69.160"
    return event


def _protovalidate(events: list[te.TrackedEvent]) -> dict[int, list[FieldViolation]]:
    request_level, per_item = validation.split_item_violations(
        validation.violations(pb.IngestEventsRequest(events=events)), "events"
    )
    assert request_level == []
    return per_item


def _pipeline_check(events: list[te.TrackedEvent]) -> dict[int, list[FieldViolation]]:
    found: dict[int, list[FieldViolation]] = {}
    convert.incoming_events(events, "10.0.0.1", "", shape_violations=found)
    return found


def test_every_declared_rule_of_the_event_has_a_case() -> None:
    # A rule added to tracked_event.proto fails here until shape.py checks it and a case
    # proves it.
    assert _declared_rules(te.TrackedEvent.DESCRIPTOR) == set(RULE_CASES)


def test_a_valid_event_has_no_violations() -> None:
    assert shape.event_violations(_valid_event(), "events[0]") == []
    assert _pipeline_check([_valid_event()]) == {} == _protovalidate([_valid_event()])


@pytest.mark.parametrize("rule", list(RULE_CASES), ids=lambda rule: f"{rule[0]}:{rule[1]}")
def test_each_rule_is_enforced_as_protovalidate_does(rule: tuple[str, str]) -> None:
    mutate, path = RULE_CASES[rule]
    bad = _valid_event()
    mutate(bad)
    events = [_valid_event(), bad, _valid_event()]
    expected = _protovalidate(events)
    assert list(expected) == [1]
    assert expected[1][0].field == f"events[1]{path}"
    assert _pipeline_check(events) == expected
    assert shape.event_violations(bad, "events[1]") == expected[1]


_CHARS = "az09_AZ.:-é \n/"


def _text_near(limit: int) -> st.SearchStrategy[str]:
    short = st.text(alphabet=_CHARS, max_size=6)
    long = st.builds(lambda n, tail: "x" * n + tail, st.integers(max(0, limit - 3), limit), short)
    return st.one_of(st.just(""), short, long)


_INT32_EDGES = [-(2**31), -1, 0, 1, 9_999, 10_000, 10_001, 2**31 - 1]


@st.composite
def _events(draw: st.DrawFn) -> te.TrackedEvent:
    event = te.TrackedEvent(
        event_id=draw(_text_near(64)),
        event_type=te.TrackedEventType.ValueType(draw(st.integers(-1, 7))),
        event_name=draw(
            st.one_of(st.sampled_from(["ticket_viewed", "a", "a1_b"]), _text_near(128))
        ),
        session_id=draw(_text_near(128)),
        user_id=draw(_text_near(128)),
        anonymous_id=draw(_text_near(128)),
        definition_version=draw(st.sampled_from(_INT32_EDGES)),
    )
    event.page.url = draw(_text_near(2048))
    event.page.title = draw(_text_near(512))
    event.page.referrer = draw(_text_near(2048))
    event.ticketing.ticketed_event_id = draw(_text_near(64))
    event.ticketing.campaign_id = draw(_text_near(64))
    event.ticketing.order_id = draw(_text_near(64))
    event.ticketing.quantity = draw(st.sampled_from(_INT32_EDGES))
    event.client.source = te.EventSource.ValueType(draw(st.integers(-1, 6)))
    event.client.user_agent = draw(_text_near(1024))
    event.client.ip_address = draw(
        st.one_of(st.sampled_from(["", "::1", "81.2.69.160", "fe80::1"]), _text_near(45))
    )
    event.client.locale = draw(_text_near(35))
    return event


@settings(max_examples=300, deadline=None)
@given(st.lists(_events(), min_size=1, max_size=4))
def test_random_events_get_the_same_violations_as_from_protovalidate(
    events: list[te.TrackedEvent],
) -> None:
    assert _pipeline_check(events) == _protovalidate(events)


@pytest.mark.parametrize("count", [0, 1, 1000, 1001])
def test_the_edge_checks_the_item_count_as_protovalidate_does(count: int) -> None:
    assert {m.rsplit("/", 1)[1] for m in ITEMS_VALIDATED_BY_SERVICER} == {
        "IngestEvents",
        "UploadEvents",
    }
    for kind in (pb.IngestEventsRequest, pb.UploadEventsRequest):
        request = kind(events=[_valid_event()] * count)
        assert _item_count_violations(request, "events") == validation.violations(request)


def test_the_edge_validates_in_full_a_request_with_other_rules() -> None:
    # ReplayQuarantinedEventsRequest's items carry rules of their own.
    request = pb.ReplayQuarantinedEventsRequest(quarantined_event_ids=["x"])
    assert _item_count_violations(request, "quarantined_event_ids") is None
