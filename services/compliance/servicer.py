"""Compliance service: consent, erasure, export, retention, audit, API keys (issue #6)."""

from __future__ import annotations

from bilten.analytics.compliance.v1 import compliance_service_pb2 as pb
from bilten.analytics.compliance.v1 import compliance_service_pb2_grpc as pb_grpc

from services.platform.unbuilt import answer_unbuilt


@answer_unbuilt(pb.DESCRIPTOR.services_by_name["ComplianceService"], "issue #6, compliance")
class ComplianceServicer(pb_grpc.ComplianceServiceServicer):
    pass
