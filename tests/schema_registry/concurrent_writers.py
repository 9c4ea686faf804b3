"""Worker processes for the concurrency tests.

Kept apart from the test module so that spawned workers import only the registry (not
pytest): process start-up dominates these tests on a 2-core machine.
"""

from __future__ import annotations

import json
import multiprocessing
from multiprocessing.synchronize import Barrier
from typing import Any

from schema_registry.registry import SchemaRegistry, SchemaRequest
from schema_registry.storage import open_store

PROCESSES = 4
PER_PROCESS = 6

Result = tuple[str, str, str, int]  # job, subject, tag, schema id


def schema_text(tag: str) -> str:
    return json.dumps(
        {
            "type": "record",
            "name": "Evt",
            "fields": [
                {"name": "id", "type": "long"},
                {"name": f"f_{tag}", "type": ["null", "string"], "default": None},
            ],
        }
    )


def _worker(url: str, index: int, barrier: Barrier, out: Any) -> None:
    try:
        store = open_store(url, pool_size=2)
        registry = SchemaRegistry(store)
        results: list[Result] = []
        # 1. Everyone registers the same schema under the same subject, repeatedly.
        barrier.wait(60)
        for _ in range(PER_PROCESS):
            sid = registry.register("same-subject", SchemaRequest(schema_text("shared")))
            results.append(("same", "same-subject", "shared", sid))
        # 2. The same schema under one subject per process.
        barrier.wait(60)
        subject = f"subject-{index}"
        sid = registry.register(subject, SchemaRequest(schema_text("cross")))
        results.append(("cross", subject, "cross", sid))
        # 3. Distinct schemas, all into one subject: no version may be lost.
        barrier.wait(60)
        for n in range(PER_PROCESS):
            tag = f"p{index}_{n}"
            sid = registry.register("busy-subject", SchemaRequest(schema_text(tag)))
            results.append(("distinct", "busy-subject", tag, sid))
        store.close()
        out.put(("ok", index, results))
    except BaseException as exc:
        out.put(("error", index, repr(exc)))


def run_concurrent_writers(url: str) -> list[Result]:
    """Start the workers, let them race through the three jobs, collect what they saw."""
    # Tables exist before the race starts, so the race is about registration only.
    open_store(url, pool_size=1).close()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, i, barrier, out)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    collected: list[Result] = []
    try:
        for _ in procs:
            status, index, payload = out.get(timeout=120)
            if status != "ok":
                raise AssertionError(f"worker {index} failed: {payload}")
            collected += payload
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return collected


def versions_of(url: str, subject: str) -> list[dict[str, Any]]:
    store = open_store(url, pool_size=1)
    try:
        registry = SchemaRegistry(store)
        versions = registry.list_versions(subject, deleted=True, deleted_only=False)
        return [registry.get_version(subject, v, deleted=True) for v in versions]
    finally:
        store.close()
