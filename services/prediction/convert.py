"""Proto <-> domain conversion for the prediction servicer."""

from __future__ import annotations

from datetime import UTC, datetime

from bilten.analytics.prediction.v1 import prediction_service_pb2 as pb
from google.protobuf import timestamp_pb2

from services.platform.auth import Principal
from services.platform.errors import FieldViolation, invalid_request, tenant_mismatch
from services.prediction.alerts import METRICS, Alert, AnomalyFilter, ThresholdRule
from services.prediction.anomaly import Severity
from services.prediction.churn import ScoredUser
from services.prediction.demand import ForecastPoint, Target
from services.prediction.registry import PLATFORM, ModelKind, ModelRecord, ModelState

KINDS = {
    pb.MODEL_KIND_CHURN: ModelKind.CHURN,
    pb.MODEL_KIND_DEMAND_FORECAST: ModelKind.DEMAND_FORECAST,
    pb.MODEL_KIND_REVENUE_FORECAST: ModelKind.REVENUE_FORECAST,
    pb.MODEL_KIND_ANOMALY: ModelKind.ANOMALY,
}
_KIND_PROTOS = {v: k for k, v in KINDS.items()}
_STATES = {
    ModelState.TRAINING: pb.MODEL_STATE_TRAINING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.PROMOTED: pb.MODEL_STATE_PROMOTED,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
}
SEVERITIES = {
    pb.ALERT_SEVERITY_UNSPECIFIED: Severity.WARNING,
    pb.ALERT_SEVERITY_WARNING: Severity.WARNING,
    pb.ALERT_SEVERITY_CRITICAL: Severity.CRITICAL,
}
_SEVERITY_PROTOS = {
    Severity.WARNING: pb.ALERT_SEVERITY_WARNING,
    Severity.CRITICAL: pb.ALERT_SEVERITY_CRITICAL,
}
TARGETS = {pb.FORECAST_TARGET_TICKETS: Target.TICKETS, pb.FORECAST_TARGET_REVENUE: Target.REVENUE}


def tenant(caller: Principal) -> str:
    """The credential's tenant; platform-wide for a platform admin without one."""
    if caller.tenant_id:
        return caller.tenant_id
    return PLATFORM


def requested_tenant(caller: Principal, requested: str) -> str:
    """The tenant comes from the credential; only a platform admin may name another."""
    if caller.is_platform_admin:
        return requested or tenant(caller)
    if requested and requested != caller.tenant_id:
        raise tenant_mismatch()
    return tenant(caller)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def model(record: ModelRecord) -> pb.Model:
    metrics = dict(record.metrics)
    # Also in `metrics`, where clients read it before `training_progress` existed.
    if record.state is ModelState.TRAINING:
        metrics["training_progress"] = record.progress
    out = pb.Model(
        model_id=record.model_id,
        kind=_KIND_PROTOS[record.kind],
        state=_STATES[record.state],
        metrics={k: float(v) for k, v in metrics.items() if v == v},  # drop NaN
        feature_names=list(record.feature_names),
        create_time=timestamp(record.created_at),
        training_progress=record.progress,
        training_stage=record.stage,
        failure_message=record.failure,
    )
    if record.training_start:
        out.training_start_time.CopyFrom(timestamp(record.training_start))
    if record.training_end:
        out.training_end_time.CopyFrom(timestamp(record.training_end))
    return out


def churn_prediction(scored: ScoredUser) -> pb.ChurnPrediction:
    return pb.ChurnPrediction(
        user_id=scored.user_id,
        churn_probability=scored.churn_probability,
        top_features=[
            pb.FeatureContribution(feature=name, contribution=value)
            for name, value in scored.top_features
        ],
    )


def forecast_point(point: ForecastPoint) -> pb.ForecastPoint:
    return pb.ForecastPoint(
        day_start_time=timestamp(point.day_start),
        value=point.value,
        lower=point.lower,
        upper=point.upper,
    )


_SOURCE_PROTOS = {
    "detector": pb.ANOMALY_SOURCE_DETECTOR,
    "live": pb.ANOMALY_SOURCE_LIVE,
    "threshold": pb.ANOMALY_SOURCE_THRESHOLD,
}


def anomaly(alert: Alert) -> pb.Anomaly:
    return pb.Anomaly(
        anomaly_id=alert.alert_id,
        metric_name=alert.metric_name,
        time=timestamp(alert.time),
        observed_value=alert.observed,
        expected_lower=alert.expected_lower,
        expected_upper=alert.expected_upper,
        score=alert.score,
        severity=_SEVERITY_PROTOS[alert.severity],
        expected_value=alert.expected,
        source=_SOURCE_PROTOS.get(alert.source, pb.ANOMALY_SOURCE_UNSPECIFIED),
        rule_id=alert.rule_id,
    )


_SEVERITIES = {proto: severity for severity, proto in _SEVERITY_PROTOS.items()}


def anomaly_filter(request: pb.ListAnomaliesRequest) -> AnomalyFilter:
    """The request's filters; INVALID_ARGUMENT naming the field for an unknown metric or
    an empty time range."""
    problems: list[FieldViolation] = []
    if request.metric_name and request.metric_name not in METRICS:
        problems.append(
            FieldViolation("metric_name", f"unknown metric; one of {', '.join(METRICS)}")
        )
    start = request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None
    end = request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None
    if start is not None and end is not None and start >= end:
        problems.append(FieldViolation("end_time", "must be after start_time"))
    if problems:
        raise invalid_request(problems)
    return AnomalyFilter(
        metric_name=request.metric_name,
        start=start,
        end=end,
        min_severity=_SEVERITIES.get(request.min_severity),
    )


def threshold_rule(rule: ThresholdRule) -> pb.ThresholdRule:
    out = pb.ThresholdRule(
        rule_id=rule.rule_id,
        metric_name=rule.metric_name,
        severity=_SEVERITY_PROTOS[rule.severity],
    )
    if rule.lower is not None:
        out.lower = rule.lower
    if rule.upper is not None:
        out.upper = rule.upper
    return out
