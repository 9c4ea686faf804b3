"""Prediction service: churn, forecasts, anomalies, model registry (issue #7)."""

from __future__ import annotations

from bilten.analytics.prediction.v1 import prediction_service_pb2 as pb
from bilten.analytics.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.platform.unbuilt import answer_unbuilt


@answer_unbuilt(pb.DESCRIPTOR.services_by_name["PredictionService"], "issue #7, prediction")
class PredictionServicer(pb_grpc.PredictionServiceServicer):
    pass
