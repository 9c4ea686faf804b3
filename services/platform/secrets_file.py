"""Process secrets: taken from settings when given, else created once in the data dir.

Secure by default: a fresh `up` gets random keys (mode 0600), never a built-in
constant. Secrets never pass through logs: the dataclass hides them from repr.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from services.platform.settings import PlatformSettings

SECRETS_FILE = "secrets.json"
_KEYS = ("jwt_secret", "api_key_pepper", "ip_hash_key", "subject_key_encryption_key")


@dataclass(frozen=True)
class Secrets:
    jwt_secret: str = field(repr=False)
    api_key_pepper: str = field(repr=False)
    ip_hash_key: str = field(repr=False)
    subject_key_encryption_key: str = field(repr=False)


def load_secrets(settings: PlatformSettings) -> Secrets:
    """Settings win; missing ones come from (or are added to) `<data_dir>/secrets.json`."""
    given = {k: getattr(settings, k) for k in _KEYS}
    if all(given.values()):
        return Secrets(**given)
    path = Path(settings.data_dir) / SECRETS_FILE
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [k for k in _KEYS if not stored.get(k)]
    if missing:
        for key in missing:
            stored[key] = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f)
        os.replace(tmp, path)
    return Secrets(**{k: given[k] or stored[k] for k in _KEYS})
