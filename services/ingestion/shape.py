"""The shape rules of a `TrackedEvent`, checked by the pipeline instead of protovalidate.

The rules are the `buf.validate` annotations of bilten/analytics/type/v1/
tracked_event.proto. protovalidate evaluates them field by field through CEL at
~10-20 µs per event, the largest cost of a batch; the same rules as plain Python
comparisons cost ~1-2 µs. The batch RPCs (`IngestEvents`, `UploadEvents`, see
services/platform/grpc_edge.py `ITEMS_VALIDATED_BY_SERVICER`) therefore leave their
items to the servicer: `convert.incoming_events` tests these rules on the values it
reads anyway and calls `event_violations` for an event that fails, which reports
exactly what protovalidate reports: the same field paths, descriptions and order.
tests/unit/test_ingestion_shape.py checks that against protovalidate for every rule and
for random events, and fails when the proto gains a rule this module does not know.
"""

from __future__ import annotations

import re

from bilten.analytics.type.v1 import tracked_event_pb2

from services.platform.errors import FieldViolation

DEFINED_EVENT_TYPES = frozenset(tracked_event_pb2.TrackedEventType.values())
DEFINED_SOURCES = frozenset(tracked_event_pb2.EventSource.values())

# RE2's `^...$` without the multiline flag is the whole text; `fullmatch` is the same in
# Python (`$` alone would also match before a trailing newline).
EVENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]*").fullmatch
EVENT_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*").fullmatch
IP_ADDRESS_PATTERN = re.compile(r"[0-9a-fA-F:.]*").fullmatch

_IDENTITY = "one of user_id or anonymous_id is required"
_UNDEFINED_ENUM = "value must be one of the defined enum values"
_EVENT_ID_MISMATCH = "does not match regex pattern `^[A-Za-z0-9._:-]*$`"
_EVENT_NAME_MISMATCH = "does not match regex pattern `^[a-z][a-z0-9_]*$`"
_IP_MISMATCH = "does not match regex pattern `^$|^[0-9a-fA-F:.]+$`"
_QUANTITY_RANGE = "must be greater than or equal to 0 and less than or equal to 10000"
_NOT_NEGATIVE = "must be greater than or equal to 0"


def _at_most(limit: int) -> str:
    return f"must be at most {limit} characters"


def event_violations(event: tracked_event_pb2.TrackedEvent, path: str) -> list[FieldViolation]:
    """Every shape violation of `event`, whose field path is `path` (`events[3]`), in
    protovalidate's order: the message rule, then the fields in declaration order."""
    found: list[FieldViolation] = []
    add = found.append
    if not event.user_id and not event.anonymous_id:
        add(FieldViolation(path, _IDENTITY))
    event_id = event.event_id
    if len(event_id) > 64:
        add(FieldViolation(f"{path}.event_id", _at_most(64)))
    if not EVENT_ID_PATTERN(event_id):
        add(FieldViolation(f"{path}.event_id", _EVENT_ID_MISMATCH))
    if event.event_type not in DEFINED_EVENT_TYPES:
        add(FieldViolation(f"{path}.event_type", _UNDEFINED_ENUM))
    name = event.event_name
    if len(name) < 1:
        add(FieldViolation(f"{path}.event_name", "must be at least 1 characters"))
    if len(name) > 128:
        add(FieldViolation(f"{path}.event_name", _at_most(128)))
    if not EVENT_NAME_PATTERN(name):
        add(FieldViolation(f"{path}.event_name", _EVENT_NAME_MISMATCH))
    for field in ("session_id", "user_id", "anonymous_id"):
        if len(getattr(event, field)) > 128:
            add(FieldViolation(f"{path}.{field}", _at_most(128)))
    page = event.page
    for field, limit in (("url", 2048), ("title", 512), ("referrer", 2048)):
        if len(getattr(page, field)) > limit:
            add(FieldViolation(f"{path}.page.{field}", _at_most(limit)))
    ticketing = event.ticketing
    for field in ("ticketed_event_id", "campaign_id", "order_id"):
        if len(getattr(ticketing, field)) > 64:
            add(FieldViolation(f"{path}.ticketing.{field}", _at_most(64)))
    if not 0 <= ticketing.quantity <= 10000:
        add(FieldViolation(f"{path}.ticketing.quantity", _QUANTITY_RANGE))
    client = event.client
    if client.source not in DEFINED_SOURCES:
        add(FieldViolation(f"{path}.client.source", _UNDEFINED_ENUM))
    if len(client.user_agent) > 1024:
        add(FieldViolation(f"{path}.client.user_agent", _at_most(1024)))
    ip_address = client.ip_address
    if len(ip_address) > 45:
        add(FieldViolation(f"{path}.client.ip_address", _at_most(45)))
    if not IP_ADDRESS_PATTERN(ip_address):
        add(FieldViolation(f"{path}.client.ip_address", _IP_MISMATCH))
    if len(client.locale) > 35:
        add(FieldViolation(f"{path}.client.locale", _at_most(35)))
    if event.definition_version < 0:
        add(FieldViolation(f"{path}.definition_version", _NOT_NEGATIVE))
    return found
