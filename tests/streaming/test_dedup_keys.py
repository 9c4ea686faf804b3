"""The processor's in-memory dedup window and its keys (no broker needed)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from services.streaming.processor import SharedDedup, dedup_keys

pytestmark = pytest.mark.unit


def test_keys_are_unambiguous_whatever_the_ids_contain() -> None:
    keys = dedup_keys(pa.array(["a:b", "a", "t", "t"]), pa.array(["c", "b:c", "e1", "e1"]))
    assert keys[0] != keys[1]  # ("a:b", "c") and ("a", "b:c") join to the same text
    assert keys[2] == keys[3]
    assert len(set(keys)) == 3


def test_window_drops_repeats_within_a_batch_across_batches_and_from_the_store() -> None:
    dedup = SharedDedup(window_seconds=60, max_ids=1_000)
    dedup.warm([("t1", "stored")], at=100.0)
    first = dedup_keys(pa.array(["t1", "t1", "t1", "t2"]), pa.array(["a", "a", "stored", "a"]))
    assert dedup.filter_new(first, now=101.0).tolist() == [True, False, False, True]
    dedup.add([first[0], first[3]], now=101.0)
    again = dedup_keys(pa.array(["t1", "t2", "t2"]), pa.array(["a", "a", "b"]))
    assert dedup.filter_new(again, now=102.0).tolist() == [False, False, True]
    # Past the window the ids are forgotten; a failed commit's keys are taken back.
    assert dedup.filter_new(again, now=200.0).tolist() == [True, True, True]
    dedup.add(again, now=200.0)
    dedup.remove(again)
    assert dedup.filter_new(again, now=201.0).tolist() == [True, True, True]
