"""Deduplication of client event ids inside a time window, per tenant.

Ids are scoped by tenant (two tenants may use the same id). The window is the platform's
(`dedup_window_seconds`, 24 h by default) unless the tenant has one of its own
(`dedup_window_by_tenant`); ids stay in memory for the longest window in use.

Ids are reserved while their batch is being committed and confirmed only after the
commit, so a failed commit never makes a retry look like a duplicate. Memory is bounded
by `max_ids` (about 100 B each): past it the oldest ids leave the window early, and
`early_evictions` counts them so operators can see the window shrinking.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping


class DedupWindow:
    def __init__(
        self,
        window_seconds: float,
        max_ids: int = 5_000_000,
        tenant_windows: Mapping[str, float] | None = None,
    ) -> None:
        self.window_seconds = window_seconds
        self.tenant_windows = dict(tenant_windows or {})
        # How long an id must be remembered: the longest window of any tenant.
        self.keep_seconds = max([window_seconds, *self.tenant_windows.values()])
        self.max_ids = max_ids
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # key -> accepted at
        self._pending: set[tuple[str, str]] = set()
        self.early_evictions = 0

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        horizon = now - self.keep_seconds
        while self._seen:
            accepted_at = next(iter(self._seen.values()))
            if accepted_at >= horizon and len(self._seen) <= self.max_ids:
                break
            if accepted_at >= horizon:
                self.early_evictions += 1
            self._seen.popitem(last=False)

    def is_duplicate(self, tenant_id: str, event_id: str, now: float) -> bool:
        key = (tenant_id, event_id)
        if key in self._pending:
            return True
        accepted_at = self._seen.get(key)
        return accepted_at is not None and accepted_at >= now - self.window_for(tenant_id)

    def window_for(self, tenant_id: str) -> float:
        return self.tenant_windows.get(tenant_id, self.window_seconds)

    def reserve(self, tenant_id: str, event_id: str) -> None:
        self._pending.add((tenant_id, event_id))

    def release(self, keys: list[tuple[str, str]]) -> None:
        self._pending.difference_update(keys)

    def confirm(self, keys: list[tuple[str, str]], now: float) -> None:
        self._pending.difference_update(keys)
        for key in keys:
            self._seen[key] = now
            self._seen.move_to_end(key)
        self._expire(now)

    def warm(self, keys: list[tuple[str, str]], accepted_at: float) -> None:
        """Loads ids accepted before a restart (from the event store)."""
        for key in keys:
            self._seen[key] = accepted_at
