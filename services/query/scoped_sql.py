"""What every analysis query shares: named parameters, the tenant filter, property access.

The rules of `services.query.metrics` hold for every module of this package: values
only ever reach DuckDB as named parameters (`$name`), never formatted into the SQL
text; a tenant scope always filters on `tenant_id`, only `Scope.all_tenants()` (platform
admins) reads across tenants; times are instants in UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from services.query.metrics import EPOCH, Granularity, Scope
from services.storage.event_store import ACTORS_TABLE, EventStore

# Working memory allowed for one query's distinct-user bitmaps (as in metrics).
BITMAP_BUDGET_BYTES = 256 * 1024 * 1024


class Params:
    """Collects named parameters; `bind` returns the placeholder to put in the SQL."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}

    def bind(self, value: object, hint: str = "p") -> str:
        name = f"{hint}_{len(self.values)}"
        self.values[name] = value
        return f"${name}"


def tenant_filter(scope: Scope, params: Params) -> str:
    """`tenant_id = $…` for a tenant scope; `TRUE` only for `Scope.all_tenants()`."""
    if scope.tenant_id is None:
        return "TRUE"
    return f"tenant_id = {params.bind(scope.tenant_id, 'tenant')}"


def actor_columns(scope: Scope) -> list[str]:
    """The columns that name one person: actor keys are dense *per tenant*, so with every
    tenant in scope the tenant is part of the key."""
    return ["actor_key"] if scope.tenant_id is not None else ["tenant_id", "actor_key"]


def person_expression(scope: Scope) -> str:
    """One SQL value per person (NULL for events without one), for `count(DISTINCT …)`."""
    if scope.tenant_id is not None:
        return "actor_key"
    return "tenant_id || '/' || CAST(actor_key AS VARCHAR)"


def bucket_key_sql(granularity: Granularity, micros: str, day: str) -> str:
    """A compact key of the UTC bucket of an instant given as epoch microseconds
    (`micros`) and as its UTC calendar day (`day`, a DATE): whole minutes / hours since
    the epoch, or the first DATE of the day / ISO week / month. Plain arithmetic, no ICU
    calendar functions (see `services.query.metrics`)."""
    if granularity in (Granularity.MINUTE, Granularity.HOUR):
        step = 60_000_000 if granularity is Granularity.MINUTE else 3_600_000_000
        return f"CAST(floor({micros} / {step}) AS BIGINT)"
    if granularity is Granularity.DAY:
        return day
    return f"CAST(date_trunc('{granularity.value}', {day}) AS DATE)"


def bucket_start(key: object, granularity: Granularity) -> datetime:
    """The bucket start of a `bucket_key_sql` value."""
    if isinstance(key, date):
        return datetime(key.year, key.month, key.day, tzinfo=UTC)
    if not isinstance(key, int):
        raise TypeError(f"unexpected bucket key {key!r}")
    step = timedelta(minutes=1) if granularity is Granularity.MINUTE else timedelta(hours=1)
    return EPOCH + key * step


def json_pointer(key: str) -> str:
    """RFC 6901 pointer to a top-level property: any key works, dots and quotes too."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def property_text(params: Params, key: str) -> str:
    """SQL for a property's value as text: strings as they are, numbers and booleans in
    their JSON spelling (`2.5`, `true`), objects and arrays as compact JSON, NULL when
    the property is missing or JSON null."""
    return f"json_extract_string(properties_json, {params.bind(json_pointer(key), 'path')})"


def properties_match(params: Params, pairs: tuple[tuple[str, str], ...]) -> str:
    """SQL that is true when every `(key, value)` pair matches `property_text` exactly."""
    if not pairs:
        return "TRUE"
    return " AND ".join(
        f"coalesce({property_text(params, key)} = {params.bind(value, 'value')}, FALSE)"
        for key, value in pairs
    )


def bitmap_bytes(store: EventStore, scope: Scope) -> int:
    """Bytes of one distinct-actor bitmap over the scope (one per tenant when every
    tenant is in scope): DuckDB sizes `bitstring_agg` from the `actor_key` statistics."""
    if scope.tenant_id is not None:
        stats = store.read(f"SELECT coalesce(max(actor_key), 0) + 1 AS width FROM {ACTORS_TABLE}")
        tenants = 1
    else:
        stats = store.read(
            f"SELECT coalesce(max(actor_key), 0) + 1 AS width,"
            f" count(DISTINCT tenant_id) AS tenants FROM {ACTORS_TABLE}"
        )
        tenants = max(1, int(stats.column("tenants")[0].as_py()))
    width = int(stats.column("width")[0].as_py())
    return tenants * (width // 8 + 1)
