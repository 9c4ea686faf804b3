"""End-to-end: SIGKILL of `up` mid-ingestion loses no acknowledged event."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc

from services.storage.event_store import DuckDBEventStore
from tests.conftest import tracked_event
from tests.e2e.conftest import start_system

# One worker runs the e2e tier: two `up` systems at once overload a 2-core box.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e")]


def test_sigkill_mid_ingestion_keeps_every_acknowledged_event(tmp_path: Path) -> None:
    system = start_system(tmp_path / "data")
    assert system.process is not None
    acknowledged: list[str] = []
    failed_batches = 0
    lock = threading.Lock()
    stop = threading.Event()

    def send(sender: int) -> None:
        nonlocal failed_batches
        metadata = (("authorization", f"Bearer {system.credentials['write_key']}"),)
        with grpc.insecure_channel(system.grpc_target) as channel:
            stub = pb_grpc.IngestionServiceStub(channel)
            batch_no = 0
            while not stop.is_set():
                events = [
                    tracked_event("load_test", event_id=f"s{sender}-b{batch_no}-e{i}")
                    for i in range(200)
                ]
                batch_no += 1
                try:
                    response = stub.IngestEvents(
                        pb.IngestEventsRequest(events=events), metadata=metadata, timeout=5
                    )
                except grpc.RpcError:
                    with lock:
                        failed_batches += 1
                    return
                with lock:
                    acknowledged.extend(
                        r.event_id
                        for r in response.results
                        if r.status == pb.INGEST_STATUS_ACCEPTED
                    )

    senders = [threading.Thread(target=send, args=(n,)) for n in range(3)]
    for thread in senders:
        thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 5_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(system.process.pid, signal.SIGKILL)
    system.process.wait(timeout=10)
    stop.set()
    for thread in senders:
        thread.join(timeout=30)
    assert len(acknowledged) >= 5_000, "ingestion did not get going before the kill"
    assert failed_batches >= 1, "the kill did not interrupt ingestion"

    store = DuckDBEventStore(system.data_dir / "events.duckdb")
    try:
        stored = (
            store.read("SELECT event_id FROM tracked_events WHERE event_name = ?", ["load_test"])
            .column("event_id")
            .to_pylist()
        )
    finally:
        store.close()
    missing = set(acknowledged) - set(stored)
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:3]}"
    assert len(stored) == len(set(stored)), "an event was stored twice"
