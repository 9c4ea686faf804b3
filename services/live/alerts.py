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

Across processes (the cluster shape, where prediction is its own Deployment and each
process has its own hub): with `BILTEN_REDIS_URL` set, the mesh gives the prediction
service a `RedisAlertBus` as its sink; every process serving the aggregation service
listens on the same Redis channel and relays the alerts into its hub, so StreamAlerts
subscribers anywhere see them (still scoped by tenant by the hub). Without Redis,
alerts stay in the process that raised them.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import structlog

from services.live.mailbox import Mailbox, Subscription
from services.platform.redis_channel import ChannelListener, redis_failures

# redis-py is imported only where the bus is used (every process imports this module).
if TYPE_CHECKING:
    from redis.asyncio import Redis

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

    @property
    def subscriber_count(self) -> int:
        """Open alert streams of this process (the `bilten_alert_subscribers` gauge)."""
        return sum(len(mailboxes) for mailboxes in self._subscribers.values())

    def close(self) -> None:
        """Ends every subscription (server shutdown)."""
        for mailboxes in self._subscribers.values():
            for mailbox in list(mailboxes):
                mailbox.close()
        self._subscribers.clear()


# --- the shared bus (cluster shape) ------------------------------------------------------

CHANNEL = "bilten:alerts:v1"
# Publishing is on the detection path: a slow Redis counts as a down one.
REDIS_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class WireAlert:
    """An alert as it crosses Redis (an `AlertLike` again on the other side)."""

    alert_id: str
    tenant_id: str
    metric_name: str
    severity: str
    observed: float
    expected_lower: float
    expected_upper: float
    time: datetime
    message: str
    source: str = ""
    rule_id: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "alert_id": self.alert_id,
                "tenant_id": self.tenant_id,
                "metric_name": self.metric_name,
                "severity": self.severity,
                # JSON has no infinity: an open bound travels as null.
                "observed": self.observed,
                "expected_lower": self.expected_lower
                if math.isfinite(self.expected_lower)
                else None,
                "expected_upper": self.expected_upper
                if math.isfinite(self.expected_upper)
                else None,
                "time": self.time.isoformat(),
                "message": self.message,
                "source": self.source,
                "rule_id": self.rule_id,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> WireAlert:
        body = json.loads(raw)
        lower, upper = body["expected_lower"], body["expected_upper"]
        return cls(
            alert_id=str(body["alert_id"]),
            tenant_id=str(body["tenant_id"]),
            metric_name=str(body["metric_name"]),
            severity=str(body["severity"]),
            observed=float(body["observed"]),
            expected_lower=-math.inf if lower is None else float(lower),
            expected_upper=math.inf if upper is None else float(upper),
            time=datetime.fromisoformat(body["time"]),
            message=str(body["message"]),
            source=str(body.get("source", "")),
            rule_id=str(body.get("rule_id", "")),
        )

    @classmethod
    def of(cls, alert: AlertLike) -> WireAlert:
        return cls(
            alert_id=alert.alert_id,
            tenant_id=alert.tenant_id,
            metric_name=alert.metric_name,
            severity=str(_severity(alert.severity)),
            observed=float(alert.observed),
            expected_lower=float(alert.expected_lower),
            expected_upper=float(alert.expected_upper),
            time=alert.time,
            message=_message(alert),
            source=str(getattr(alert, "source", "") or ""),
            rule_id=str(getattr(alert, "rule_id", "") or ""),
        )


class RedisAlertBus:
    """The `AlertSink` of the cluster shape: alerts cross processes over Redis pub/sub.

    `publish` sends the alert on one channel (`CHANNEL`); `start` (in a process whose
    `AlertsHub` has StreamAlerts subscribers, the aggregation service) listens on it and
    hands every alert to that hub, which keeps scoping them by tenant. A process that
    both publishes and listens gets its own alerts back through Redis, once.

    Pub/sub is at most once: an alert published while no listener is connected (Redis
    down, a listener reconnecting) is not delivered live. Nothing is lost for good: the
    prediction service stored it for `ListAnomalies` before publishing. When Redis
    refuses a publish, the alert goes to the local hub (if any) and a warning is logged.
    """

    def __init__(self, client: Redis, hub: AlertsHub | None, channel: str = CHANNEL) -> None:
        self._client = client
        self._hub = hub
        self._channel = channel
        self._failures = redis_failures()
        self._listener = ChannelListener(client, channel, self._relay, "alert_bus")
        self.received = 0

    @classmethod
    def from_url(
        cls, url: str, hub: AlertsHub | None, *, password: str = "", channel: str = CHANNEL
    ) -> RedisAlertBus:
        from redis.asyncio import Redis

        # No socket timeout: the listener's connection waits for messages indefinitely;
        # publishes are bounded by `REDIS_TIMEOUT_SECONDS` instead.
        client = Redis.from_url(
            url,
            password=password or None,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            health_check_interval=30,
        )
        return cls(client, hub, channel)

    @property
    def subscribed(self) -> bool:
        """Whether the listener has subscribed (since start)."""
        return self._listener.subscribed.is_set()

    async def publish(self, alert: AlertLike) -> None:
        payload = WireAlert.of(alert).to_json()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                await self._client.publish(self._channel, payload)
        except self._failures as exc:
            log.warning(
                "alert_bus_publish_failed",
                error=f"{type(exc).__name__}: {exc}",
                fallback="this process's alert hub" if self._hub else "none",
            )
            if self._hub is not None:
                await self._hub.publish(alert)

    async def start(self) -> None:
        """Starts relaying the channel into the hub; returns once subscribed."""
        if self._hub is not None:
            await self._listener.start(REDIS_TIMEOUT_SECONDS * 5)

    async def _relay(self, payload: bytes) -> None:
        assert self._hub is not None  # only listening with a hub
        try:
            alert = WireAlert.from_json(payload)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("alert_bus_bad_message", error=str(exc))
            return
        self.received += 1
        await self._hub.publish(alert)

    async def aclose(self) -> None:
        await self._listener.aclose()
        await self._client.aclose()


def alert_bus_for(url: str, hub: AlertsHub | None, password: str = "") -> RedisAlertBus | None:
    """The Redis bus when `url` (the `redis_url` setting) is set; None: in process."""
    return RedisAlertBus.from_url(url, hub, password=password) if url else None
