"""Embedded stores of the one-machine shape, each behind a small Protocol.

- `event_store`: tracked events in DuckDB (`EventStore`, `DuckDBEventStore`);
- `group_commit`: the embedded event log, durable group commit into the event store
  (`EventLog`, `GroupCommitter`); the cluster shape puts Kafka behind `EventLog`;
- `metadata_store`: tenants, API keys and the quarantine in SQLite (`MetadataStore`,
  `SQLiteMetadataStore`); the cluster shape puts PostgreSQL behind it.
"""
