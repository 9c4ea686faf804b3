"""WebSockets onto the live gRPC streams: `/ws/analytics/live`, `/ws/analytics/alerts`,
`/ws/analytics/events/{ticketed_event_id}` (the seed's paths), served through Envoy.

A bridge rather than a second implementation: each WebSocket opens the matching
server-streaming RPC of `AggregationService` with the client's credential, so the
authentication, scopes, tenant scoping and numbers are exactly the gRPC ones (and the
SSE ones through Envoy's transcoder). `routes` maps paths and credentials (no I/O);
`server` runs it. Started by `bilten-analytics up` next to the mesh, or alone with
`python -m services.websocket_bridge --grpc-target HOST:PORT` (cluster shape).
See docs/live.md for the message format, authentication and close codes.
"""
