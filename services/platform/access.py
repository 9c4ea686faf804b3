"""Which scope each RPC requires. An RPC missing here is refused: secure by default.

Health checking and reflection are the only unauthenticated methods, because load
balancers, Kubernetes probes and grpcurl must reach them without credentials.
"""

from __future__ import annotations

from services.platform.auth import Scope

_INGESTION = "/bilten.analytics.ingestion.v1.IngestionService/"
_QUERY = "/bilten.analytics.query.v1.QueryService/"
_AGGREGATION = "/bilten.analytics.aggregation.v1.AggregationService/"
_COMPLIANCE = "/bilten.analytics.compliance.v1.ComplianceService/"
_PREDICTION = "/bilten.analytics.prediction.v1.PredictionService/"

REQUIRED_SCOPES: dict[str, str] = {
    **{
        _INGESTION + m: Scope.EVENTS_WRITE
        for m in (
            "Track",
            "TrackPage",
            "TrackConversion",
            "TrackCustom",
            "IngestEvents",
            "UploadEvents",
            "ReplayQuarantinedEvents",
        )
    },
    _INGESTION + "ListQuarantinedEvents": Scope.EVENTS_READ,
    # Freshness of the data (lag) is what event senders and dashboards ask about; the
    # figures are platform-wide counts, no tenant's events.
    _INGESTION + "GetPipelineStatus": Scope.EVENTS_READ,
    **{
        _QUERY + m: Scope.ANALYTICS_READ
        for m in (
            "GetMetrics",
            "GetTicketedEventAnalytics",
            "GetUserAnalytics",
            "ComputeFunnel",
            "ComputeCohorts",
            "GetSessionAnalytics",
            "ExecuteQuery",
            "GetReport",
            "ListReports",
        )
    },
    _QUERY + "CreateReport": Scope.REPORTS_WRITE,
    _QUERY + "DeleteReport": Scope.REPORTS_WRITE,
    **{
        _AGGREGATION + m: Scope.ANALYTICS_READ
        for m in (
            "GetActiveUsers",
            "GetConversions",
            "GetRevenue",
            "GetGeoDistribution",
            "GetExperimentResults",
            "StreamLiveMetrics",
            "StreamTicketedEventLiveMetrics",
            "StreamAlerts",
        )
    },
    **{
        _COMPLIANCE + m: Scope.COMPLIANCE_WRITE
        for m in ("RecordConsent", "CreateErasureRequest", "UpdateRetentionPolicy")
    },
    **{
        _COMPLIANCE + m: Scope.COMPLIANCE_READ
        for m in (
            "GetConsent",
            "GetErasureRequest",
            "ExportSubjectData",
            "GetRetentionPolicy",
            "ListAuditLogEntries",
            "VerifyAuditLog",
        )
    },
    **{
        _COMPLIANCE + m: Scope.KEYS_MANAGE
        for m in ("CreateApiKey", "ListApiKeys", "RotateApiKey", "RevokeApiKey")
    },
    **{
        _PREDICTION + m: Scope.PREDICTIONS_READ
        for m in (
            "PredictChurn",
            "Forecast",
            "ListAnomalies",
            "GetModel",
            "ListModels",
            "ListThresholdRules",
        )
    },
    **{
        _PREDICTION + m: Scope.MODELS_MANAGE
        for m in ("TrainModel", "PromoteModel", "CreateThresholdRule", "DeleteThresholdRule")
    },
}

PUBLIC_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# Batch RPCs whose items are validated one by one: a bad item is rejected in its
# result, the rest of the batch still goes through.
# Values: (item field, whether it is repeated).
PER_ITEM_VALIDATION: dict[str, tuple[str, bool]] = {
    _INGESTION + "IngestEvents": ("events", True),
    _INGESTION + "UploadEvents": ("events", True),
    # Single-event calls too: the bad event is quarantined before the call fails.
    _INGESTION + "Track": ("event", False),
    _INGESTION + "TrackPage": ("event", False),
    _INGESTION + "TrackConversion": ("event", False),
    _INGESTION + "TrackCustom": ("event", False),
}
