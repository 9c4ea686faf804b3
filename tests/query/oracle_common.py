"""Plain-Python building blocks shared by the analyses' oracles.

Written the obvious way (dicts, sorted lists, loops over every event), on purpose unlike
the SQL and numpy they check.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime

from services.events.model import TrackedEvent
from services.query.metrics import Scope

Person = tuple[str, str, str]  # (tenant, "user" | "anonymous", id)


def person(event: TrackedEvent) -> Person | None:
    if event.user_id:
        return (event.tenant_id, "user", event.user_id)
    if event.anonymous_id:
        return (event.tenant_id, "anonymous", event.anonymous_id)
    return None


def in_scope(event: TrackedEvent, scope: Scope) -> bool:
    return scope.tenant_id is None or event.tenant_id == scope.tenant_id


def by_person(events: list[TrackedEvent], scope: Scope) -> dict[Person, list[TrackedEvent]]:
    """Each person's events in time order."""
    out: dict[Person, list[TrackedEvent]] = defaultdict(list)
    for event in events:
        who = person(event)
        if who is not None and in_scope(event, scope):
            out[who].append(event)
    for evs in out.values():
        evs.sort(key=lambda e: e.occurred_at)
    return out


def prop(event: TrackedEvent, key: str) -> str | None:
    """The property as text: strings as is, other JSON in DuckDB's compact spelling."""
    value = json.loads(event.properties_json).get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":"))


def us(a: datetime, b: datetime) -> int:
    """Microseconds from a to b, exactly."""
    delta = b - a
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
