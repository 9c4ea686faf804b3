"""The ingestion dedup window: per tenant, with per-tenant windows of their own."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.ingestion.dedup import DedupWindow
from services.platform.settings import PlatformSettings

pytestmark = pytest.mark.unit


def test_ids_are_scoped_by_tenant_and_each_tenant_may_have_its_own_window() -> None:
    dedup = DedupWindow(3600, tenant_windows={"short": 60, "long": 7 * 86_400})
    for tenant in ("default", "short", "long"):
        dedup.reserve(tenant, "e1")
        dedup.confirm([(tenant, "e1")], now=0.0)
    assert not dedup.is_duplicate("other", "e1", now=1.0)  # another tenant's id
    # 2 minutes later: past the short window only.
    assert dedup.is_duplicate("default", "e1", now=120.0)
    assert not dedup.is_duplicate("short", "e1", now=120.0)
    # 2 days later: only the long window still holds it, so memory keeps it that long.
    assert not dedup.is_duplicate("default", "e1", now=2 * 86_400.0)
    dedup.confirm([("default", "e2")], now=2 * 86_400.0)  # expiry runs
    assert dedup.is_duplicate("long", "e1", now=2 * 86_400.0)
    assert dedup.keep_seconds == 7 * 86_400


def test_settings_read_per_tenant_windows_as_json_and_refuse_bad_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BILTEN_DEDUP_WINDOW_BY_TENANT", '{"org-a": 604800, "org-b": 0}')
    settings = PlatformSettings()
    assert settings.dedup_window_by_tenant == {"org-a": 604800, "org-b": 0}
    assert settings.longest_dedup_window_seconds == 604800
    monkeypatch.setenv("BILTEN_DEDUP_WINDOW_BY_TENANT", '{"org-a": 99999999}')
    with pytest.raises(ValidationError, match="dedup_window_by_tenant"):
        PlatformSettings()
