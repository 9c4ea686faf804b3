"""Live metrics and alerts, in process: what the aggregation service's streams read.

- `observers`: the input protocol. Whoever makes tracked events durable (the ingestion
  pipeline with the embedded event log, the Kafka stream processor) reports each batch
  to an `EventObserver`; the mesh fans it out to the live hub, the rollup maintainer and
  the result cache.
- `metrics_hub`: per-tenant live state (active sessions, events of the last minute,
  tickets and revenue today, per ticketed event) and its subscribers.
- `alerts`: the `AlertSink` protocol and the `AlertsHub` that implements it; the
  prediction service's anomaly monitor and `thresholds` publish into it.
- `mailbox`: the bounded, drop-to-latest buffer between the hub and each subscriber,
  so a slow reader never slows the hub, let alone ingestion.

No gRPC here; `services/aggregation/servicer.py` adapts these to the streaming RPCs.
See docs/live.md.
"""
