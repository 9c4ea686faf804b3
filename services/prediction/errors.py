"""Errors of the prediction service, in the platform's one error model.

Not enough history is INVALID_ARGUMENT with reason INSUFFICIENT_HISTORY and a field
violation naming the input that cannot be served (the kind, the horizon); no serving
model is FAILED_PRECONDITION with reason MODEL_NOT_READY (AIP-193: the request is fine,
the system is not in the state it needs). The messages say exactly what is missing and
how to get it.
"""

from __future__ import annotations

from services.platform.errors import AnalyticsError, FieldViolation, StatusCode


def insufficient_data(message: str, field: str = "kind") -> AnalyticsError:
    """The tenant's history cannot support the model or forecast asked for."""
    return AnalyticsError(
        StatusCode.INVALID_ARGUMENT,
        "INSUFFICIENT_HISTORY",
        message,
        field_violations=[FieldViolation(field, message)],
    )


def no_serving_model(kind: str) -> AnalyticsError:
    return AnalyticsError(
        StatusCode.FAILED_PRECONDITION,
        "MODEL_NOT_READY",
        f"no promoted {kind} model in this tenant: train one with TrainModel, then "
        "PromoteModel (the first version that beats its baseline is promoted automatically)",
        metadata={"model_kind": kind},
    )


def unknown_users(user_ids: list[str], positions: list[int], as_of: str) -> AnalyticsError:
    violations = [
        FieldViolation(
            f"user_ids[{i}]",
            f"unknown user {user_ids[i]!r}: no tracked event in the 30 days before {as_of}",
        )
        for i in positions[:100]
    ]
    return AnalyticsError(
        StatusCode.NOT_FOUND,
        "NOT_FOUND",
        f"{len(positions)} of {len(user_ids)} users have no recent history to score "
        f"(first: {user_ids[positions[0]]!r}); churn is predicted for users active in the "
        f"30 days before {as_of}",
        field_violations=violations,
        metadata={"unknown_user_count": str(len(positions))},
    )


def feature_schema_mismatch(model: tuple[str, ...], serving: tuple[str, ...]) -> AnalyticsError:
    """The promoted model was trained on other features than serving computes (a model
    saved by an older build, say): it cannot score until a version is trained again."""
    missing = [f for f in model if f not in serving]
    extra = [f for f in serving if f not in model]
    detail = ", ".join(
        part
        for part in (
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {extra[:5]}" if extra else "",
            "same features in another order" if not missing and not extra else "",
        )
        if part
    )
    return AnalyticsError(
        StatusCode.FAILED_PRECONDITION,
        "INVALID_REQUEST",
        f"the promoted churn model's feature schema differs from the serving features "
        f"({detail}): train a new version with TrainModel and promote it",
        metadata={"model_features": str(len(model)), "serving_features": str(len(serving))},
    )
