"""Child process of the durability test: appends batches forever and, after each
`append` returns, prints that batch's event ids as one line (`ACK id,id,...`).

The parent SIGKILLs it at an arbitrary moment; every printed id must then be in the
file. Run as `python -m tests.storage.durability_writer PATH ROUND`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from services.storage.event_store import DuckDBEventStore
from tests.storage.generated_events import random_events

BATCH = 1000


def main() -> None:
    path, round_no = Path(sys.argv[1]), int(sys.argv[2])
    store = DuckDBEventStore(path)
    # One batch is generated ahead and re-sent under new ids, so the loop is nothing
    # but appends.
    pool = random_events(round_no, BATCH, tenants=("acme", "globex"), users=5000)
    batch_no = 0
    while True:
        ids = [f"r{round_no}-b{batch_no}-{i}" for i in range(BATCH)]
        batch = [dataclasses.replace(e, event_id=i) for e, i in zip(pool, ids, strict=True)]
        store.append(batch)
        sys.stdout.write("ACK " + ",".join(ids) + "\n")
        sys.stdout.flush()
        batch_no += 1


if __name__ == "__main__":
    main()
