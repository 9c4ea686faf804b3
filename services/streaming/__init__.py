"""The cluster shape of the event log: Kafka topics, the Avro envelope, the stream processor.

See docs/streaming.md for the topic layout, the exactly-once argument and back-pressure.
"""
