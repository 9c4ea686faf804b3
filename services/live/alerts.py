"""Alerts as they are raised, to every live subscriber of their tenant.

`AlertSink` is what producers need: `async publish(alert)`. The prediction service's
anomaly monitor (`services.prediction.alerts.AnomalyMonitor(sink=...)`) and the live
threshold rules (`services.live.thresholds`) publish into the `AlertsHub`, which
`StreamAlerts` reads from. An alert is anything shaped like `AlertLike` (the
prediction service's `Alert` is); the hub turns it into a `LiveAlert`, the record the
stream sends, adding the raise time and, when the producer has none, a message.

Delivery: each subscriber has a bounded mailbox (`capacity`, default 256); a reader
that falls that far behind loses its oldest alerts, counted in `Subscription.dropped`
and logged, and publishing never waits. Alerts of a tenant go to that tenant's
subscribers and to all-tenant subscribers (platform admins); platform alerts
(`tenant_id` "") only to the latter. Nothing is stored here: the prediction service
keeps its anomalies for `ListAnomalies`; the stream is live only.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import structlog

from services.live.mailbox import Mailbox, Subscription

log = structlog.get_logger(__name__)


class AlertSeverity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertLike(Protocol):
    """What a producer hands to `AlertSink.publish` (read-only attributes)."""

    @property
    def alert_id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...  # "" for a platform alert
    @property
    def metric_name(self) -> str: ...
    @property
    def severity(self) -> str: ...  # info | warning | critical (a StrEnum is fine)
    @property
    def observed(self) -> float: ...
    @property
    def expected_lower(self) -> float: ...
    @property
    def expected_upper(self) -> float: ...
    @property
    def time(self) -> datetime: ...  # the moment (or interval start) the value describes


class AlertSink(Protocol):
    async def publish(self, alert: AlertLike) -> None:
        """Delivers the alert to whoever watches; never blocks on a slow reader."""
        ...


@dataclass(frozen=True, slots=True)
class LiveAlert:
    alert_id: str
    tenant_id: str
    metric_name: str
    severity: AlertSeverity
    observed: float
    expected_lower: float
    expected_upper: float
    time: datetime
    raised_at: datetime
    message: str


def _severity(value: str) -> AlertSeverity:
    try:
        return AlertSeverity(str(value).lower())
    except ValueError:
        return AlertSeverity.WARNING


def _message(alert: AlertLike) -> str:
    given = getattr(alert, "message", "")
    if isinstance(given, str) and given:
        return given
    source = getattr(alert, "source", "") or "alert"
    rule = getattr(alert, "rule_id", "")
    bounds = ", ".join(
        f"{name} {value:g}"
        for name, value in (("lower", alert.expected_lower), ("upper", alert.expected_upper))
        if math.isfinite(value)
    )
    text = f"{source}: {alert.metric_name} = {alert.observed:g}"
    if bounds:
        text += f" outside the expected range ({bounds})"
    return text + (f" (rule {rule})" if rule else "")


class AlertsHub:
    """The in-process `AlertSink` with live subscribers (see the module docstring)."""

    def __init__(
        self, capacity: int = 256, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._capacity = capacity
        self._clock = clock
        self._subscribers: dict[str | None, set[Mailbox[LiveAlert]]] = {}
        self.published = 0

    async def publish(self, alert: AlertLike) -> None:
        live = LiveAlert(
            alert_id=alert.alert_id,
            tenant_id=alert.tenant_id,
            metric_name=alert.metric_name,
            severity=_severity(alert.severity),
            observed=float(alert.observed),
            expected_lower=float(alert.expected_lower),
            expected_upper=float(alert.expected_upper),
            time=alert.time,
            raised_at=self._clock(),
            message=_message(alert),
        )
        self.published += 1
        targets = [None] if not live.tenant_id else [live.tenant_id, None]
        for scope in targets:
            for mailbox in list(self._subscribers.get(scope, ())):
                before = mailbox.dropped
                mailbox.offer(live)
                if mailbox.dropped != before:
                    log.warning("alert_subscriber_behind", dropped=mailbox.dropped)

    def subscribe(self, tenant_id: str | None) -> Subscription[LiveAlert]:
        """Alerts of one tenant, or of every tenant and the platform (`None`)."""
        mailbox: Mailbox[LiveAlert] = Mailbox(self._capacity)
        self._subscribers.setdefault(tenant_id, set()).add(mailbox)

        def unregister() -> None:
            self._subscribers.get(tenant_id, set()).discard(mailbox)

        return Subscription(mailbox, unregister)

    def close(self) -> None:
        """Ends every subscription (server shutdown)."""
        for mailboxes in self._subscribers.values():
            for mailbox in list(mailboxes):
                mailbox.close()
        self._subscribers.clear()
