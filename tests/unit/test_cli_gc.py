"""The serving process's garbage-collector set-up once it is up (services/cli.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from services.cli import _freeze_startup_heap

pytestmark = pytest.mark.unit


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_the_startup_heap_is_frozen_without_its_garbage() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    gc.unfreeze()
    Cycle()  # unreachable, alive only through its cycle
    _freeze_startup_heap()
    assert gc.get_freeze_count() > 0
    assert not any(type(o) is Cycle for o in gc.get_objects())
    assert gc.get_threshold() == (20_000, 10, 10)
    # Objects made after start-up are still collected.
    Cycle()
    gc.collect()
    assert not any(type(o) is Cycle for o in gc.get_objects())
