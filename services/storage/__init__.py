"""Embedded stores of the one-machine shape, each behind a small Protocol.

- `event_store`: tracked events in DuckDB (`EventStore`, `DuckDBEventStore`);
- `group_commit`: the embedded event log, durable group commit into the event store
  (`EventLog`, `GroupCommitter`); the cluster shape puts Kafka behind `EventLog`;
- `metadata_store`: tenants, API keys, the quarantine and the compliance records in SQLite
  (`MetadataStore`, `SQLiteMetadataStore`, `open_metadata_store`);
- `postgres_metadata_store`: the same on PostgreSQL, shared by every pod of the cluster
  shape (`PostgresMetadataStore`, selected by `metadata_store_url`).
"""
