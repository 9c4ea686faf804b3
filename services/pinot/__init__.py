"""Apache Pinot in the cluster shape: the schema and REALTIME table generated from the Avro
envelope (`config`), the command that applies them (`apply`), and a metrics backend for
the query and aggregation services that speaks Pinot SQL through pinotdb (`backend`).
"""
