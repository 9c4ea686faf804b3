"""gRPC adapter of the prediction service: proto -> `PredictionService` -> proto.

Thin by design: the tenant comes from the credential, shapes are validated at the edge,
and every decision lives in `services.prediction.service`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bilten.analytics.prediction.v1 import prediction_service_pb2 as pb
from bilten.analytics.prediction.v1 import prediction_service_pb2_grpc as pb_grpc

from services.platform.grpc_edge import principal
from services.prediction import convert
from services.prediction.service import PredictionService, PredictionSettings
from services.storage.event_store import EventStore


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    def __init__(
        self,
        store: EventStore,
        data_dir: Path,
        settings: PredictionSettings | None = None,
        service: PredictionService | None = None,
    ) -> None:
        self.service = service or PredictionService(store, data_dir, settings=settings)
        self._started = False

    def start_background(self) -> None:
        """Starts the anomaly monitor and the retraining schedule (idempotent).

        Not done in `__init__`: the mesh builds every servicer in every process, also
        where prediction is not served. Call this where the server starts; until then
        the first prediction RPC starts it."""
        if not self._started:
            self._started = True
            self.service.start_background()

    async def PredictChurn(
        self, request: pb.PredictChurnRequest, context: Any
    ) -> pb.PredictChurnResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        model_id, scored = await asyncio.to_thread(
            self.service.predict_churn, tenant, list(request.user_ids)
        )
        return pb.PredictChurnResponse(
            predictions=[convert.churn_prediction(s) for s in scored], model_id=model_id
        )

    async def Forecast(self, request: pb.ForecastRequest, context: Any) -> pb.ForecastResponse:
        self.start_background()
        tenant = convert.requested_tenant(principal(), request.tenant_id)
        result = await asyncio.to_thread(
            self.service.forecast,
            tenant,
            convert.TARGETS[request.target],
            request.ticketed_event_id,
            request.horizon_days,
            request.interval_level,
        )
        return pb.ForecastResponse(
            points=[convert.forecast_point(p) for p in result.points],
            model_id=result.model_id,
            currency_code=result.currency,
        )

    async def ListAnomalies(
        self, request: pb.ListAnomaliesRequest, context: Any
    ) -> pb.ListAnomaliesResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        where = convert.anomaly_filter(request)
        alerts, token = await asyncio.to_thread(
            self.service.list_anomalies, tenant, request.page_size, request.page_token, where
        )
        return pb.ListAnomaliesResponse(
            anomalies=[convert.anomaly(a) for a in alerts], next_page_token=token
        )

    async def TrainModel(
        self, request: pb.TrainModelRequest, context: Any
    ) -> pb.TrainModelResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        kind = convert.KINDS[request.kind]
        await asyncio.to_thread(self.service.precheck, tenant, kind)
        created = self.service.start_training(tenant, kind)
        return pb.TrainModelResponse(model=convert.model(created))

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        record = await asyncio.to_thread(self.service.get_model, tenant, request.model_id)
        return pb.GetModelResponse(model=convert.model(record))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        kind = convert.KINDS.get(request.kind)
        records, token = await asyncio.to_thread(
            self.service.list_models, tenant, kind, request.page_size, request.page_token
        )
        return pb.ListModelsResponse(
            models=[convert.model(r) for r in records], next_page_token=token
        )

    async def PromoteModel(
        self, request: pb.PromoteModelRequest, context: Any
    ) -> pb.PromoteModelResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        record = await asyncio.to_thread(self.service.promote, tenant, request.model_id)
        return pb.PromoteModelResponse(model=convert.model(record))

    async def CreateThresholdRule(
        self, request: pb.CreateThresholdRuleRequest, context: Any
    ) -> pb.CreateThresholdRuleResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        rule = request.rule
        stored = await asyncio.to_thread(
            self.service.put_rule,
            tenant,
            rule.metric_name,
            rule.lower if rule.HasField("lower") else None,
            rule.upper if rule.HasField("upper") else None,
            convert.SEVERITIES[rule.severity],
            rule.rule_id,
        )
        return pb.CreateThresholdRuleResponse(rule=convert.threshold_rule(stored))

    async def ListThresholdRules(
        self, request: pb.ListThresholdRulesRequest, context: Any
    ) -> pb.ListThresholdRulesResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        rules = await asyncio.to_thread(self.service.list_rules, tenant)
        return pb.ListThresholdRulesResponse(rules=[convert.threshold_rule(r) for r in rules])

    async def DeleteThresholdRule(
        self, request: pb.DeleteThresholdRuleRequest, context: Any
    ) -> pb.DeleteThresholdRuleResponse:
        self.start_background()
        tenant = convert.tenant(principal())
        await asyncio.to_thread(self.service.delete_rule, tenant, request.rule_id)
        return pb.DeleteThresholdRuleResponse()
