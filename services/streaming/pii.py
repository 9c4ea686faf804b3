"""Crypto-shredding on the Kafka path: seal a batch's PII before producing it, open it in
the processor before the store commit (services/compliance/pii_cipher.py has the format).

- `PiiSealer.seal_table` (Kafka log, before `encode_table`): blanks the clear columns
  user_id, anonymous_id, ip_hash, browser_family, browser_version, os_family,
  device_type and the personal properties inside properties_json, and adds the columns
  of `SEALED_FIELD_NAMES` (key ids, subject token, ciphertexts). What goes to Kafka (and
  so to Pinot) holds no PII in clear.
- `PiiOpener.open_table` (processor, after decoding): restores the clear columns from the
  ciphertexts. A record whose key was destroyed is *anonymised*, not dead-lettered: ids,
  IP hash and user agent empty, personal properties dropped, every other column kept
  (so event counts, revenue, tickets stay exact). A ciphertext that does not open with
  an existing key (tampered) is anonymised the same way and counted apart.

Per-row Python (AES-GCM through `cryptography`, a few microseconds per field): crypto-
shredding costs throughput; it is off unless `BILTEN_CRYPTO_SHREDDING=true`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from services.compliance.pii_cipher import PiiCipher, PiiIntegrityError
from services.streaming.avro_envelope import SEALED_FIELD_NAMES

UA_COLUMNS = ("browser_family", "browser_version", "os_family", "device_type")
_CLEARED = ("user_id", "anonymous_id", "ip_hash", *UA_COLUMNS)
_CIPHER_COLUMN = {
    "user_id": "pii_user_id",
    "anonymous_id": "pii_anonymous_id",
    "ip_hash": "pii_ip_hash",
    "user_agent": "pii_user_agent",
    "properties": "pii_properties",
}

# schema id of an event definition -> names of its properties marked personal
PersonalFields = Callable[[int], frozenset[str]]


def no_personal_fields(_schema_id: int) -> frozenset[str]:
    return frozenset()


def _split_properties(text: str, personal: frozenset[str]) -> tuple[str, str]:
    """(clear properties JSON, personal properties JSON or "")."""
    if not personal or text == "{}":
        return text, ""
    values = orjson.loads(text)
    if not isinstance(values, dict):
        return text, ""
    secret = {k: v for k, v in values.items() if k in personal}
    if not secret:
        return text, ""
    clear = {k: v for k, v in values.items() if k not in personal}
    return orjson.dumps(clear).decode(), orjson.dumps(secret).decode()


def _replace(table: pa.Table, name: str, values: list[Any]) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(index), pa.array(values, pa.string()))


class PiiSealer:
    """Used by the Kafka event log (any thread)."""

    def __init__(self, cipher: PiiCipher, personal: PersonalFields = no_personal_fields) -> None:
        self.cipher = cipher
        self.personal = personal
        self.withheld_events = 0
        self._lock = threading.Lock()

    def seal_table(self, table: pa.Table) -> pa.Table:
        """`table` (columns of EVENT_ARROW_SCHEMA) with the PII blanked and the sealed
        columns appended."""
        rows = table.select(
            [
                "tenant_id",
                "event_id",
                "received_at",
                "schema_id",
                "properties_json",
                *_CLEARED,
            ]
        ).to_pylist()
        sealed_columns: dict[str, list[str]] = {name: [] for name in SEALED_FIELD_NAMES}
        properties: list[str] = []
        withheld = 0
        # One key-store read per tenant for the whole batch (a round trip each on PostgreSQL).
        self.cipher.keys.prefetch_subjects(
            (row["tenant_id"], subject)
            for row in rows
            for subject in (row["user_id"], row["anonymous_id"])
        )
        for row in rows:
            clear_props, personal_props = _split_properties(
                row["properties_json"], self.personal(row["schema_id"])
            )
            user_agent = [row[c] for c in UA_COLUMNS]
            plaintexts = {
                "ip_hash": row["ip_hash"],
                "user_agent": orjson.dumps(user_agent).decode() if any(user_agent) else "",
                "properties": personal_props,
            }
            if not row["user_id"] and not row["anonymous_id"]:
                # No subject an erasure could name: nothing to seal, PII stays as is
                # (docs/compliance.md); personal properties too.
                properties.append(row["properties_json"])
                for name in SEALED_FIELD_NAMES:
                    sealed_columns[name].append("")
                continue
            sealed = self.cipher.seal(
                row["tenant_id"],
                row["event_id"],
                row["user_id"],
                row["anonymous_id"],
                plaintexts,
                row["received_at"],
            )
            withheld += sealed.withheld
            properties.append(clear_props)
            sealed_columns["pii_key_ids"].append(sealed.key_ids)
            sealed_columns["subject_token"].append(sealed.subject_token)
            for field_name, column in _CIPHER_COLUMN.items():
                sealed_columns[column].append(sealed.ciphertexts.get(field_name, ""))
        if withheld:
            with self._lock:
                self.withheld_events += withheld
        out = _replace(table, "properties_json", properties)
        # Events with neither id keep their clear ip_hash / user agent (nothing sealed).
        keep_clear = [not r["user_id"] and not r["anonymous_id"] for r in rows]
        for name in _CLEARED:
            values = [r[name] if keep else "" for r, keep in zip(rows, keep_clear, strict=True)]
            out = _replace(out, name, values)
        for name in SEALED_FIELD_NAMES:
            out = out.append_column(name, pa.array(sealed_columns[name], pa.string()))
        return out


@dataclass(frozen=True, slots=True)
class OpenResult:
    table: pa.Table  # columns of the input table, PII restored or removed
    sealed_events: int  # rows that carried sealed PII
    anonymised_events: int  # rows whose key was destroyed: PII removed
    unreadable_events: int  # rows whose ciphertext did not open with an existing key


class PiiOpener:
    """Used by the stream processor."""

    def __init__(self, cipher: PiiCipher) -> None:
        self.cipher = cipher

    def open_table(self, table: pa.Table, sealed: pa.Table) -> OpenResult:
        """`table` (EVENT_ARROW_SCHEMA) with the clear columns restored from `sealed`
        (the same rows' `SEALED_FIELD_NAMES` columns)."""
        if table.num_rows == 0 or not any(sealed.column("pii_key_ids").to_pylist()):
            return OpenResult(table, 0, 0, 0)
        seals = sealed.to_pylist()
        rows = table.select(["tenant_id", "event_id", "properties_json", *_CLEARED]).to_pylist()
        # One key-store read per tenant for the whole batch (a round trip each on PostgreSQL).
        self.cipher.keys.prefetch_key_ids(
            (row["tenant_id"], key_id)
            for row, seal in zip(rows, seals, strict=True)
            for key_id in seal["pii_key_ids"].split(",")
        )
        count = anonymised = unreadable = 0
        for row, seal in zip(rows, seals, strict=True):
            if not seal["pii_key_ids"]:
                continue
            count += 1
            ciphertexts = {name: seal[column] for name, column in _CIPHER_COLUMN.items()}
            try:
                opened = self.cipher.open(
                    row["tenant_id"], row["event_id"], seal["pii_key_ids"], ciphertexts
                )
            except PiiIntegrityError:
                opened = None
                unreadable += 1
            else:
                anonymised += opened is None
            if opened is None:
                for name in _CLEARED:
                    row[name] = ""
                continue  # personal properties were never in clear: dropped
            row["user_id"] = opened.get("user_id", "")
            row["anonymous_id"] = opened.get("anonymous_id", "")
            row["ip_hash"] = opened.get("ip_hash", "")
            if opened.get("user_agent"):
                for name, value in zip(UA_COLUMNS, orjson.loads(opened["user_agent"]), strict=True):
                    row[name] = value
            if opened.get("properties"):
                merged = orjson.loads(row["properties_json"])
                merged.update(orjson.loads(opened["properties"]))
                row["properties_json"] = orjson.dumps(merged).decode()
        out = table
        for name in ("properties_json", *_CLEARED):
            out = _replace(out, name, [r[name] for r in rows])
        return OpenResult(out, count, anonymised, unreadable)


__all__ = [
    "OpenResult",
    "PersonalFields",
    "PiiOpener",
    "PiiSealer",
    "no_personal_fields",
]
