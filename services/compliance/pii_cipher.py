"""Sealing the PII fields of one tracked event with its subjects' keys (crypto-shredding).

What is sealed (field name -> plaintext), each as its own ciphertext:

- `user_id`, `anonymous_id`, `ip_hash`;
- `user_agent`: the JSON list [browser_family, browser_version, os_family, device_type];
- `properties`: a JSON object of the custom properties the event's definition marks
  personal (`"personal": true` on the Avro field of the definition; see
  services/ingestion/definitions.py). Properties of events without a definition, and
  unmarked properties, stay in clear.

Which key: the event's subjects are its `user_id` and its `anonymous_id` (an erasure
names either, services/compliance/erasure.py). With one id the data key is derived from
that subject's key; with both it is derived from both keys (HKDF over the two), so
destroying *either* subject's key makes the event undecipherable, as erasing either id
deletes the event's row in the embedded store. `key_ids` names the keys used, in order.

Format of each ciphertext (text, for Avro strings): base64 of
`0x01 | nonce (12 bytes, random) | AES-256-GCM ciphertext+tag`, with associated data
binding tenant, event id, field name and key ids: a ciphertext copied into another
event, another field or another tenant does not open.

`subject_token`: the key id of the actor's key (user id when set, else anonymous id),
HMAC-SHA256(subject key, "bilten subject token v1")[:16] as hex. It is one value per
(tenant, subject) while the key lives, so distinct counts over it equal distinct counts
over the ids; it is computed from the key alone, so once the key is destroyed the token
left in Kafka and Pinot still counts one actor (aggregates stay right) but nothing can
map it back to a person. A subject seen again after its erasure gets a fresh key, hence
a new token: a new lifecycle.

Events with neither id have no subject an erasure could name: nothing is sealed.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.compliance.subject_keys import NONCE_BYTES, BaseSubjectKeyStore, SubjectKey

FORMAT_VERSION: Final = b"\x01"
SEALED_FIELDS: Final = ("user_id", "anonymous_id", "ip_hash", "user_agent", "properties")
_DATA_KEY_INFO: Final = b"bilten pii data key v1"


class PiiIntegrityError(ValueError):
    """A ciphertext does not open with a key that exists: tampered, or bound to another
    tenant / event / field."""


@dataclass(frozen=True, slots=True)
class SealedPii:
    """`key_ids` comma-separated ("" when nothing is sealed); `ciphertexts` holds the
    non-empty fields only; `withheld` is True when a subject's key was destroyed before
    the event was received, so its PII is dropped instead of sealed."""

    key_ids: str = ""
    subject_token: str = ""
    ciphertexts: Mapping[str, str] = field(default_factory=dict)
    withheld: bool = False


def _data_key(keys: list[SubjectKey]) -> AESGCM:
    material = b"".join(k.key for k in keys)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DATA_KEY_INFO).derive(
        material
    )
    return AESGCM(derived)


def _aad(tenant_id: str, event_id: str, field_name: str, key_ids: str) -> bytes:
    return b"bilten-pii\x01" + "\x00".join((tenant_id, event_id, field_name, key_ids)).encode()


class PiiCipher:
    def __init__(self, keys: BaseSubjectKeyStore) -> None:
        self.keys = keys

    def seal(
        self,
        tenant_id: str,
        event_id: str,
        user_id: str,
        anonymous_id: str,
        plaintexts: Mapping[str, str],
        received_at: datetime | None = None,
    ) -> SealedPii:
        """Seals the non-empty `plaintexts` (names from `SEALED_FIELDS`; user_id and
        anonymous_id are taken from the arguments)."""
        subjects = [s for s in (user_id, anonymous_id) if s]
        if not subjects:
            return SealedPii()
        keys: list[SubjectKey] = []
        for subject in subjects:
            key = self.keys.get_or_create(tenant_id, subject, received_at)
            if key is None:
                return SealedPii(withheld=True)
            keys.append(key)
        key_ids = ",".join(k.key_id for k in keys)
        cipher = _data_key(keys)
        values = {**plaintexts, "user_id": user_id, "anonymous_id": anonymous_id}
        sealed: dict[str, str] = {}
        for name in SEALED_FIELDS:
            text = values.get(name, "")
            if not text:
                continue
            nonce = os.urandom(NONCE_BYTES)
            body = cipher.encrypt(nonce, text.encode(), _aad(tenant_id, event_id, name, key_ids))
            sealed[name] = base64.b64encode(FORMAT_VERSION + nonce + body).decode("ascii")
        return SealedPii(key_ids, keys[0].key_id, sealed)

    def open(
        self, tenant_id: str, event_id: str, key_ids: str, ciphertexts: Mapping[str, str]
    ) -> dict[str, str] | None:
        """The plaintexts; None when one of the keys is gone (destroyed: the PII is
        shredded). Raises `PiiIntegrityError` for a ciphertext that does not open."""
        if not key_ids:
            if any(ciphertexts.values()):
                raise PiiIntegrityError("ciphertexts without key ids")
            return {}
        keys: list[SubjectKey] = []
        for key_id in key_ids.split(","):
            key = self.keys.by_key_id(tenant_id, key_id)
            if key is None:
                return None
            keys.append(key)
        cipher = _data_key(keys)
        opened: dict[str, str] = {}
        for name, text in ciphertexts.items():
            if not text:
                continue
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise PiiIntegrityError(f"{name}: not base64") from exc
            if raw[:1] != FORMAT_VERSION or len(raw) < 1 + NONCE_BYTES + 16:
                raise PiiIntegrityError(f"{name}: unknown ciphertext format")
            nonce, body = raw[1 : 1 + NONCE_BYTES], raw[1 + NONCE_BYTES :]
            try:
                plain = cipher.decrypt(nonce, body, _aad(tenant_id, event_id, name, key_ids))
            except InvalidTag as exc:
                raise PiiIntegrityError(f"{name}: does not open (tampered or misbound)") from exc
            opened[name] = plain.decode()
        return opened
