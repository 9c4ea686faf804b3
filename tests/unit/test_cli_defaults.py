"""`up`'s one-process defaults: crypto-shredding on with the Kafka event log unless the
operator set it, untouched otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import one_process_defaults
from services.platform.settings import PlatformSettings

pytestmark = pytest.mark.unit


def test_kafka_in_one_process_seals_by_default(tmp_path: Path) -> None:
    settings = PlatformSettings(data_dir=tmp_path, event_log="kafka")
    assert settings.crypto_shredding is False  # the setting's own default (for `serve`)
    assert one_process_defaults(settings).crypto_shredding is True


def test_an_explicit_choice_and_the_embedded_log_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BILTEN_CRYPTO_SHREDDING", "false")
    explicit = PlatformSettings(data_dir=tmp_path, event_log="kafka")
    assert one_process_defaults(explicit).crypto_shredding is False
    monkeypatch.delenv("BILTEN_CRYPTO_SHREDDING")
    embedded = PlatformSettings(data_dir=tmp_path)
    assert one_process_defaults(embedded).crypto_shredding is False
