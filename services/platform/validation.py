"""Request shape validation: the protovalidate rules written next to the fields.

The one place shape rules are checked. Servicers never re-check shape; ingestion's
batch RPCs get per-item violations back so one bad event does not sink its batch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import protovalidate
from google.protobuf.message import Message

from services.platform.errors import FieldViolation

_validator = protovalidate.Validator()


def _render_path(field_path: Any) -> str:
    parts: list[str] = []
    for element in field_path.elements:
        text = element.field_name
        # protovalidate returns its own protobuf runtime's messages: the subscript is a
        # oneof object (index, bool/int/string key) or None.
        subscript = element.subscript
        if subscript is not None:
            text += f"[{subscript.value}]"
        parts.append(text)
    return ".".join(parts)


def violations(message: Message) -> list[FieldViolation]:
    """All rule violations of `message`, with dotted field paths."""
    try:
        _validator.validate(message)
    except protovalidate.ValidationError as exc:
        found = []
        for violation in exc.violations:
            proto = violation.proto
            path = _render_path(proto.field) if proto.field is not None else ""
            found.append(FieldViolation(path or "(message)", proto.message))
        return found
    return []


def split_item_violations(
    found: list[FieldViolation], items_field: str, repeated: bool = True
) -> tuple[list[FieldViolation], dict[int, list[FieldViolation]]]:
    """Separates violations inside `items_field[i]` (per item) from the request's own.

    For a singular item field (`event`), everything inside it belongs to item 0; for a
    repeated one, rules on the list itself (`events`: too many items) stay request-level.
    """
    request_level: list[FieldViolation] = []
    per_item: dict[int, list[FieldViolation]] = defaultdict(list)
    prefix = items_field + "["
    for violation in found:
        # A singular item field (`event`) is item 0.
        inside = violation.field == items_field or violation.field.startswith(items_field + ".")
        if not repeated and inside:
            per_item[0].append(violation)
            continue
        if violation.field.startswith(prefix) and "]" in violation.field:
            index_text = violation.field[len(prefix) : violation.field.index("]")]
            if index_text.isdigit():
                per_item[int(index_text)].append(violation)
                continue
        request_level.append(violation)
    return request_level, dict(per_item)
