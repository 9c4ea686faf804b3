"""Settings, authentication plumbing, and the real server process (bench smoke run)."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
from pydantic import ValidationError

from schema_registry.app import create_app, load_authenticator
from schema_registry.auth import (
    AllowAllAuthenticator,
    Authenticator,
    Principal,
    StaticTokenAuthenticator,
    token_from_authorization,
)
from schema_registry.settings import RegistrySettings


@pytest.mark.unit
def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILTEN_SCHEMA_REGISTRY_PORT", "9999")
    monkeypatch.setenv("BILTEN_SCHEMA_REGISTRY_STORAGE", "postgresql://u@h:5432/db")
    monkeypatch.setenv("BILTEN_SCHEMA_REGISTRY_AUTH_TOKENS", '{"abcdefgh12": ["admin"]}')
    settings = RegistrySettings()
    assert settings.port == 9999
    assert settings.storage == "postgresql://u@h:5432/db"
    assert settings.auth_tokens == {"abcdefgh12": ["admin"]}
    assert RegistrySettings.model_fields["port"].default == 8081


@pytest.mark.unit
@pytest.mark.parametrize(
    "kwargs",
    [
        {"storage": "mysql://x"},
        {"auth_tokens": {"short": ["admin"]}},
        {"auth_tokens": {"long-enough-token": ["root"]}},
        {"workers": 2, "storage": "sqlite:///:memory:"},
        {"port": 70000},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RegistrySettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.unit
def test_refusal_at_start_without_credentials() -> None:
    with pytest.raises(ValueError, match="no authenticator"):
        create_app(RegistrySettings(storage="sqlite:///:memory:"))
    assert isinstance(
        load_authenticator(RegistrySettings(storage="sqlite:///:memory:", auth_enabled=False)),
        AllowAllAuthenticator,
    )


@pytest.mark.unit
def test_authorization_header_parsing() -> None:
    basic = base64.b64encode(b"whoever:tok-123:with-colon").decode()
    assert token_from_authorization(f"Basic {basic}") == "tok-123:with-colon"
    assert token_from_authorization("Bearer abc.def") == "abc.def"
    assert token_from_authorization("bearer   xyz ") == "xyz"
    assert token_from_authorization(None) is None
    assert token_from_authorization("Basic not-base64!") is None
    assert token_from_authorization("Basic " + base64.b64encode(b"nouser").decode()) is None
    assert token_from_authorization("Digest abc") is None


@pytest.mark.unit
def test_static_tokens_implement_the_protocol() -> None:
    auth = StaticTokenAuthenticator({"reader-token-1": ["schemas:read"]})
    assert isinstance(auth, Authenticator)
    principal = auth.authenticate("reader-token-1")
    assert principal is not None and principal.scopes == frozenset({"schemas:read"})
    assert auth.authenticate("reader-token-2") is None
    assert auth.authenticate("") is None
    assert Principal("p", frozenset({"admin"})).may(frozenset({"schemas:write", "admin"}))


@pytest.mark.integration
def test_bench_drives_a_multi_worker_server() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "schema_registry.bench",
            "--requests",
            "400",
            "--concurrency",
            "4",
            "--workers",
            "2",
            "--warmup",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "errors 0" in out.stdout, out.stdout + out.stderr
    assert "server: 2 uvicorn worker(s)" in out.stdout
