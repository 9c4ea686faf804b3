"""User-defined threshold alerts on the live metrics.

A rule bounds one live number of a tenant (or of one of its ticketed events): when the
value leaves [lower, upper] an alert is published to the `AlertSink`, once; the rule
re-arms when the value is back inside, so a metric hovering outside does not flood the
stream. Rules are evaluated after every publishing pass of the hub (at least once a
second), so a breach is reported about as fast as a metric update.

Rules come from `BILTEN_LIVE_ALERT_RULES` (JSON list, see `services.platform.settings`
and docs/live.md) or `add_rule` at run time. Threshold rules on *hourly* metrics with
anomaly detection are the prediction service's; these are for live numbers.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.live.alerts import AlertSeverity, AlertSink, LiveAlert
from services.live.metrics_hub import LiveMetricsHub


class LiveMetricName(enum.StrEnum):
    ACTIVE_SESSIONS = "active_sessions"  # tenant only
    EVENTS_LAST_MINUTE = "events_last_minute"  # tenant only
    TICKETS_SOLD_TODAY = "tickets_sold_today"
    REVENUE_TODAY = "revenue_today"  # needs a currency
    VIEWS_TODAY = "views_today"  # ticketed event only
    ACTIVE_VISITORS = "active_visitors"  # ticketed event only


_TENANT_ONLY = {LiveMetricName.ACTIVE_SESSIONS, LiveMetricName.EVENTS_LAST_MINUTE}
_TICKETED_ONLY = {LiveMetricName.VIEWS_TODAY, LiveMetricName.ACTIVE_VISITORS}


@dataclass(frozen=True, slots=True)
class ThresholdRule:
    rule_id: str
    tenant_id: str
    metric: LiveMetricName
    lower: float | None = None
    upper: float | None = None
    severity: AlertSeverity = AlertSeverity.WARNING
    ticketed_event_id: str = ""
    currency: str = ""  # for revenue_today

    def __post_init__(self) -> None:
        if self.lower is None and self.upper is None:
            raise ValueError(f"rule {self.rule_id}: needs a lower or an upper bound")
        if not self.tenant_id:
            raise ValueError(f"rule {self.rule_id}: needs a tenant")
        if self.metric in _TENANT_ONLY and self.ticketed_event_id:
            raise ValueError(f"rule {self.rule_id}: {self.metric} is a tenant metric")
        if self.metric in _TICKETED_ONLY and not self.ticketed_event_id:
            raise ValueError(f"rule {self.rule_id}: {self.metric} needs a ticketed_event_id")
        if (self.metric is LiveMetricName.REVENUE_TODAY) != bool(self.currency):
            raise ValueError(f"rule {self.rule_id}: revenue_today, and only it, takes a currency")

    @property
    def metric_name(self) -> str:
        """The name alerts carry, e.g. `revenue_today[EUR]@concert-1`."""
        name = self.metric.value + (f"[{self.currency}]" if self.currency else "")
        return name + (f"@{self.ticketed_event_id}" if self.ticketed_event_id else "")


class ThresholdMonitor:
    """Evaluates the rules on the hub's numbers; register with `hub.add_listener`."""

    def __init__(
        self,
        hub: LiveMetricsHub,
        sink: AlertSink,
        rules: Iterable[ThresholdRule] = (),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._hub = hub
        self._sink = sink
        self._clock = clock
        self._rules: dict[str, ThresholdRule] = {}
        self._firing: set[str] = set()
        for rule in rules:
            self.add_rule(rule)

    def add_rule(self, rule: ThresholdRule) -> None:
        self._rules[rule.rule_id] = rule
        self._firing.discard(rule.rule_id)

    def remove_rule(self, rule_id: str) -> None:
        self._rules.pop(rule_id, None)
        self._firing.discard(rule_id)

    def value(self, rule: ThresholdRule) -> float:
        if rule.ticketed_event_id:
            ticketed = self._hub.ticketed_snapshot(rule.tenant_id, rule.ticketed_event_id)
            values = {
                LiveMetricName.VIEWS_TODAY: ticketed.views_today,
                LiveMetricName.ACTIVE_VISITORS: ticketed.active_visitors,
                LiveMetricName.TICKETS_SOLD_TODAY: ticketed.tickets_sold_today,
            }
            money = ticketed.revenue_today
        else:
            tenant = self._hub.snapshot(rule.tenant_id)
            values = {
                LiveMetricName.ACTIVE_SESSIONS: tenant.active_sessions,
                LiveMetricName.EVENTS_LAST_MINUTE: tenant.events_last_minute,
                LiveMetricName.TICKETS_SOLD_TODAY: tenant.tickets_sold_today,
            }
            money = tenant.revenue_today
        if rule.metric is LiveMetricName.REVENUE_TODAY:
            return float(sum((m.amount for m in money if m.currency == rule.currency), 0))
        return float(values[rule.metric])

    async def evaluate(self, changed_tenants: set[str] | None = None) -> list[LiveAlert]:
        """Checks every rule (values also change with time alone); returns new alerts."""
        raised: list[LiveAlert] = []
        for rule in list(self._rules.values()):
            value = self.value(rule)
            low = rule.lower if rule.lower is not None else -math.inf
            high = rule.upper if rule.upper is not None else math.inf
            if low <= value <= high:
                self._firing.discard(rule.rule_id)
                continue
            if rule.rule_id in self._firing:
                continue
            self._firing.add(rule.rule_id)
            side, bound = ("above the upper", high) if value > high else ("below the lower", low)
            now = self._clock()
            alert = LiveAlert(
                alert_id=uuid.uuid4().hex,
                tenant_id=rule.tenant_id,
                metric_name=rule.metric_name,
                severity=rule.severity,
                observed=value,
                expected_lower=low,
                expected_upper=high,
                time=now,
                raised_at=now,
                message=f"{rule.metric_name} is {value:g}, {side} bound {bound:g}"
                f" (threshold rule {rule.rule_id})",
            )
            raised.append(alert)
            await self._sink.publish(alert)
        return raised
