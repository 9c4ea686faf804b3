"""Custom SQL: one read-only SELECT over documented views, confined to the caller's tenant.

Plain functions, no gRPC; docs/analytics.md lists the views and columns callers see.

What a caller may send: one `SELECT` (set operations, CTEs, subqueries, joins, windows,
`QUALIFY`, lambdas over lists) in DuckDB's dialect, over the view `events` (see
`EVENTS_COLUMNS`). Everything else is refused with `QUERY_REFUSED`: other statements
(DDL, writes, `COPY`, `ATTACH`, `SET`, `PRAGMA`, `CALL`...), several statements, any
other table (the store's own tables, `information_schema`, `duckdb_*`, files such as
`'x.csv'`), qualified names, table functions (`read_csv`, `glob`, `query`...), functions
outside `ALLOWED_FUNCTIONS` (system, file, network, session and sleep functions, and the
few that build arbitrarily large values from a small query, like `repeat`),
`WITH RECURSIVE`, parameters, and names starting with `__bilten`.

Two independent checks, because the caller's text is hostile by assumption:
1. sqlglot parses the text, enforces the statement rules and rewrites every reference to
   a view into a subquery over `main.tracked_events` filtered on the tenant (a bound
   parameter); only references that resolve to one of the caller's own CTEs in scope are
   left as they are. The SQL sent to DuckDB is generated from that tree (comments
   dropped), never the caller's text.
2. DuckDB's own parser (`json_serialize_sql`) reads the generated SQL back, and its tree
   is checked against allowlists: every table reference is an in-scope CTE or the
   injected scan (recognised by a per-request random alias, with its tenant filter);
   every function is allowlisted; no table function but `unnest`; nothing recursive.
   So a difference between how sqlglot and DuckDB read a construct cannot open a hole.
On top, the store runs with `enable_external_access = false` (no files, no network).

Execution: the generated SQL is wrapped as `SELECT * FROM (...) LIMIT n + 1 OFFSET o`
(n = page size, at most `MAX_PAGE_SIZE`; the extra row tells whether there is a next
page), on a cursor of its own that a timer interrupts at the deadline (`QUERY_TIMEOUT`).
Page tokens are opaque: the next offset with a hash of (tenant, SQL), so a token only
works for the same query of the same tenant. Pages are positions in the result: stable
when the query has a total `ORDER BY` and the data does not change between calls.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import secrets
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from services.platform.errors import AnalyticsError, StatusCode
from services.query.metrics import Scope
from services.storage.event_store import TABLE, DuckDBEventStore, EventStore

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
DEFAULT_TIMEOUT = timedelta(seconds=10)
MAX_TIMEOUT = timedelta(seconds=60)
MAX_SQL_LENGTH = 20_000
RESERVED_PREFIX = "__bilten"
_TENANT_PARAM = "bilten_tenant"

# The view callers query, as column expressions over `tracked_events`. Left out: the
# IP hash (a pseudonymous identifier of the client), and internal columns.
EVENTS_COLUMNS: dict[str, str] = {
    "tenant_id": "tenant_id",
    "event_id": "event_id",
    "event_type": "event_type",
    "event_name": "event_name",
    "occurred_at": "occurred_at",
    "occurred_on": "occurred_on",
    "received_at": "received_at",
    "source": "source",
    "session_id": "session_id",
    "user_id": "user_id",
    "anonymous_id": "anonymous_id",
    # The person as every metric counts them: user id, else anonymous id, namespaced.
    "actor_id": "CASE WHEN user_id <> '' THEN 'u:' || user_id"
    " WHEN anonymous_id <> '' THEN 'a:' || anonymous_id END",
    "page_url": "page_url",
    "page_title": "page_title",
    "referrer": "referrer",
    "ticketed_event_id": "ticketed_event_id",
    "campaign_id": "campaign_id",
    "order_id": "order_id",
    "revenue": "revenue",
    "currency": "currency",
    "quantity": "quantity",
    "properties": "properties_json",
    "country_code": "country_code",
    "browser_family": "browser_family",
    "browser_version": "browser_version",
    "os_family": "os_family",
    "device_type": "device_type",
}
VIEWS = {"events": EVENTS_COLUMNS}

# DuckDB function names (as its parser reports them, operators included) a query may
# call. Not here on purpose: table functions, anything reading settings, variables,
# sequences, the catalog or files (`current_setting`, `getvariable`, `nextval`,
# `stats`, `json_serialize_plan`, `query`...), sleeps and side effects (`sleep_ms`,
# `setseed`, `write_log`, `error`), and value builders whose output size a constant
# chooses (`repeat`, `lpad`, `rpad`, `format`, `printf`, `bar`, `range`,
# `generate_series`, `list_resize`, `array_resize`).
ALLOWED_FUNCTIONS = frozenset(
    # A word list reads and diffs better than 400 quoted strings.
    """
    + - * / // % ** ^ || & | ~ << >> @ ^@ @> <@ && ~~ !~~ ~~* !~~* ~~~ ->> -> = != <> < <= > >=
    abs acos asin atan atan2 cbrt ceil ceiling cos cot degrees even exp floor gcd lcm
    greatest least isfinite isinf isnan ln log log10 log2 mod pi pow power radians round
    round_even roundbankers sign sin sqrt tan trunc random add subtract multiply divide xor
    ascii bit_length char_length character_length chr concat concat_ws contains ends_with
    instr lcase left length len lower ltrim md5 nfc_normalize octet_length position prefix
    regexp_extract regexp_extract_all regexp_full_match regexp_matches regexp_replace
    regexp_split_to_array regexp_escape replace reverse right rtrim sha1 sha256 split
    split_part starts_with str_split str_split_regex string_split string_split_regex
    string_to_array strip_accents strlen strpos substr substring suffix translate trim
    ucase unicode upper url_decode url_encode levenshtein damerau_levenshtein hamming
    jaccard jaro_similarity jaro_winkler_similarity hash base64 to_base64 from_base64 hex
    to_hex unhex from_hex like_escape ilike_escape not_like_escape not_ilike_escape
    age century date_add date_diff date_part date_sub date_trunc datediff datepart datesub
    datetrunc day dayname dayofmonth dayofweek dayofyear decade epoch epoch_ms epoch_us
    epoch_ns era hour isodow isoyear julian last_day make_date make_time make_timestamp
    make_timestamptz microsecond millennium millisecond minute month monthname nanosecond
    quarter second strftime strptime try_strptime time_bucket timezone timezone_hour
    timezone_minute to_centuries to_days to_decades to_hours to_microseconds to_millennia
    to_milliseconds to_minutes to_months to_quarters to_seconds to_timestamp to_weeks
    to_years today week weekday weekofyear year yearweek now current_date
    get_current_timestamp get_current_time transaction_timestamp
    json json_array_length json_contains json_exists json_extract json_extract_path
    json_extract_path_text json_extract_string json_keys json_structure json_type
    json_valid json_value json_array json_object json_quote to_json from_json
    array_length array_extract array_contains array_has array_has_all array_has_any
    array_slice array_sort array_reverse_sort array_distinct array_unique array_to_string
    array_transform array_apply array_filter array_reduce array_value array_position
    array_cat array_concat list_aggregate list_aggr list_apply list_concat list_cat
    list_contains list_distinct list_element list_extract list_filter list_has
    list_has_all list_has_any list_position list_indexof list_reverse_sort list_slice
    list_sort list_transform list_unique list_value list_pack list_zip list_reduce
    list_count list_sum list_avg list_min list_max list_first list_last list_string_agg
    list_median list_mode list_intersect flatten cardinality element_at unnest
    struct_pack struct_extract row map map_extract map_keys map_values map_entries
    coalesce ifnull nullif if typeof uuid gen_random_uuid
    any_value approx_count_distinct approx_quantile arbitrary arg_max arg_min argmax argmin
    array_agg avg bit_and bit_or bit_xor bool_and bool_or corr count count_if count_star
    countif covar_pop covar_samp entropy favg first fsum group_concat histogram kahan_sum
    kurtosis kurtosis_pop last list listagg mad max max_by mean median min min_by mode
    product quantile quantile_cont quantile_disc regr_avgx regr_avgy regr_count
    regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy sem skewness stddev
    stddev_pop stddev_samp string_agg sum sumkahan var_pop var_samp variance
    json_group_array json_group_object weighted_avg wavg geomean geometric_mean
    cume_dist dense_rank first_value lag last_value lead nth_value ntile percent_rank rank
    rank_dense row_number
    """.split()  # noqa: SIM905
)
_EXPRESSION_CLASSES = frozenset(
    {
        "FUNCTION",
        "WINDOW",
        "CONSTANT",
        "COLUMN_REF",
        "COMPARISON",
        "CONJUNCTION",
        "OPERATOR",
        "CASE",
        "CAST",
        "TYPE",
        "SUBQUERY",
        "STAR",
        "BETWEEN",
        "LAMBDA",
        "LAMBDA_REF",
        "COLLATE",
        "POSITIONAL_REFERENCE",
        "PARAMETER",
    }
)
# Statements, and nodes that only make sense inside one, refused wherever they appear.
_REFUSED_NODES: tuple[type[exp.Expression], ...] = (
    exp.Command,
    exp.Pragma,
    exp.Set,
    exp.Copy,
    exp.Attach,
    exp.Detach,
    exp.Use,
    exp.Describe,
    exp.Show,
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.Create,
    exp.Drop,
    exp.Alter,
    exp.Into,
    exp.Placeholder,
    exp.Parameter,
    exp.SessionParameter,
)

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # it warns on input it cannot parse


def refused(message: str) -> AnalyticsError:
    return AnalyticsError(StatusCode.INVALID_ARGUMENT, "QUERY_REFUSED", message)


def timed_out(timeout: timedelta) -> AnalyticsError:
    return AnalyticsError(
        StatusCode.DEADLINE_EXCEEDED,
        "QUERY_TIMEOUT",
        f"the query ran longer than {timeout.total_seconds():g} s and was stopped",
    )


def bad_page_token(message: str) -> AnalyticsError:
    return AnalyticsError(StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", message)


@dataclass(frozen=True, slots=True)
class QueryOptions:
    page_size: int = DEFAULT_PAGE_SIZE
    page_token: str = ""
    timeout: timedelta = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1-{MAX_PAGE_SIZE}")
        if not timedelta(0) < self.timeout <= MAX_TIMEOUT:
            raise ValueError(f"the timeout must be in (0, {MAX_TIMEOUT}]")


@dataclass(frozen=True, slots=True)
class ResultColumn:
    name: str
    sql_type: str  # DuckDB's name, e.g. BIGINT, VARCHAR, TIMESTAMP WITH TIME ZONE


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: tuple[ResultColumn, ...]
    # JSON-ready values: None, bool, int (as str beyond +-2^53), float, str (timestamps
    # RFC 3339, dates ISO 8601, decimals as numbers), lists and dicts of those.
    rows: tuple[tuple[Any, ...], ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class ScopedQuery:
    """The caller's query, rewritten: DuckDB SQL plus its parameters."""

    sql: str
    params: dict[str, object]
    scan_alias: str  # the random alias of every injected tenant scan


# --- step 1: sqlglot -----------------------------------------------------------------


def _cte_names_in_scope(node: exp.Expression) -> set[str]:
    """Names of the CTEs a table reference at `node` can resolve to, as DuckDB scopes
    them: the CTEs of every enclosing query, and inside a CTE's own definition only the
    CTEs listed before it (a non-recursive CTE cannot see itself or later ones)."""
    names: set[str] = set()
    child: Any = node
    parent: Any = node.parent
    while parent is not None:
        if isinstance(parent, exp.With) and isinstance(child, exp.CTE):
            for cte in parent.expressions:
                if cte is child:
                    break
                names.add(cte.alias_or_name.lower())
        elif isinstance(parent, exp.Query):
            with_ = parent.args.get("with_")
            if with_ is not None and child is not with_:
                names.update(cte.alias_or_name.lower() for cte in with_.expressions)
        child, parent = parent, parent.parent
    return names


def _scan(view: dict[str, str], scope: Scope, alias: str) -> exp.Subquery:
    columns = ", ".join(f'{expr} AS "{name}"' for name, expr in view.items())
    where = f" WHERE {alias}.tenant_id = ${_TENANT_PARAM}" if scope.tenant_id is not None else ""
    select = sqlglot.parse_one(
        f"SELECT {columns} FROM main.{TABLE} AS {alias}{where}", read="duckdb"
    )
    return exp.Subquery(this=select)


def _check_names(tree: exp.Expression) -> None:
    for identifier in tree.find_all(exp.Identifier):
        if identifier.name.lower().startswith(RESERVED_PREFIX):
            raise refused(f"names starting with {RESERVED_PREFIX!r} are reserved")


def rewrite(sql: str, scope: Scope) -> ScopedQuery:
    """Parses, checks and rewrites the caller's SQL (step 1 of the module docstring)."""
    if len(sql) > MAX_SQL_LENGTH:
        raise refused(f"the query is longer than {MAX_SQL_LENGTH} characters")
    try:
        parsed = [s for s in sqlglot.parse(sql, read="duckdb") if s is not None]
    except SqlglotError as exc:
        raise refused(f"the query does not parse: {str(exc).splitlines()[0][:300]}") from exc
    if len(parsed) != 1:
        raise refused("send exactly one statement")
    (tree,) = parsed
    if not isinstance(tree, exp.Select | exp.SetOperation):
        raise refused(f"only SELECT queries are allowed, not {tree.key.upper()}")
    for node in tree.walk():
        if isinstance(node, _REFUSED_NODES):
            raise refused(f"{node.key.upper()} is not allowed in a query")
        if isinstance(node, exp.With) and node.args.get("recursive"):
            raise refused("WITH RECURSIVE is not allowed")
    _check_names(tree)
    scan_alias = f"{RESERVED_PREFIX}_scan_{secrets.token_hex(8)}"
    scans = sum(
        _rewrite_table(table, scope, scan_alias) for table in list(tree.find_all(exp.Table))
    )
    params: dict[str, object] = {}
    if scope.tenant_id is not None and scans:  # DuckDB refuses unused parameters
        params[_TENANT_PARAM] = scope.tenant_id
    return ScopedQuery(tree.sql(dialect="duckdb", comments=False), params, scan_alias)


def _rewrite_table(table: exp.Table, scope: Scope, scan_alias: str) -> bool:
    """Replaces a view reference by its tenant scan (True), leaves a CTE reference
    (False), refuses anything else."""
    if not isinstance(table.this, exp.Identifier):
        raise refused("table functions are not allowed; query the `events` view")
    extra = [key for key, value in table.args.items() if value and key not in ("this", "alias")]
    if table.args.get("db") or table.args.get("catalog"):
        raise refused(f"qualified names are not allowed: {table.sql(dialect='duckdb')}")
    if extra:
        raise refused(f"table modifiers are not allowed: {', '.join(sorted(extra))}")
    name = table.name.lower()
    if name in _cte_names_in_scope(table):
        if name in VIEWS:
            raise refused(f"a CTE may not be named like the view {name!r}")
        return False
    view = VIEWS.get(name)
    if view is None:
        raise refused(f"unknown table {table.name!r}; queries read the view `events`")
    scan = _scan(view, scope, scan_alias)
    alias = table.args.get("alias")
    if alias is None:
        alias = exp.TableAlias(this=exp.to_identifier(name))
    scan.set("alias", alias.copy())
    table.replace(scan)
    return True


# --- step 2: DuckDB's parse tree -----------------------------------------------------


def verify(store: EventStore, query: ScopedQuery, scope: Scope) -> None:
    """Checks the generated SQL as DuckDB parses it (step 2 of the module docstring)."""
    table = store.read("SELECT json_serialize_sql($sql) AS tree", {"sql": query.sql})
    tree = json.loads(table.column("tree")[0].as_py())
    if tree.get("error"):
        raise refused(f"DuckDB cannot read the query: {tree.get('error_message', '')[:300]}")
    statements = tree.get("statements") or []
    if len(statements) != 1:
        raise refused("send exactly one statement")
    _Verifier(query, scope).query_node(statements[0]["node"], frozenset())


_TABLE_REF_TYPES = frozenset(
    {
        "BASE_TABLE",
        "SUBQUERY",
        "JOIN",
        "TABLE_FUNCTION",
        "EXPRESSION_LIST",
        "EMPTY",
        "PIVOT",
        "SHOW_REF",
        "COLUMN_DATA",
        "DELIM_GET",
        "CTE",
    }
)


def _is_query_node(value: Any) -> bool:
    return isinstance(value, Mapping) and str(value.get("type", "")).endswith("_NODE")


class _Verifier:
    """Walks DuckDB's parse tree of the generated SQL. Known places are checked
    explicitly; every other value is walked as an expression, where a table reference or
    a query anywhere but inside a subquery expression is refused, so a construct this
    walker does not know fails closed."""

    def __init__(self, query: ScopedQuery, scope: Scope) -> None:
        self.query = query
        self.scope = scope

    def query_node(self, node: Mapping[str, Any], visible: frozenset[str]) -> None:
        kind = node.get("type")
        if kind not in ("SELECT_NODE", "SET_OPERATION_NODE"):
            raise refused(f"{str(kind).replace('_', ' ').lower()} is not allowed")
        inner = set(visible)
        for cte in (node.get("cte_map") or {}).get("map") or []:
            # A CTE sees the ones before it; the body sees them all.
            self.query_node(cte["value"]["query_node"], frozenset(inner))
            inner.add(str(cte["key"]).lower())
        scope = frozenset(inner)
        for key, value in node.items():
            if key == "cte_map":
                continue
            if key == "from_table" and kind == "SELECT_NODE":
                self.table_ref(value, scope, node)
            elif kind == "SET_OPERATION_NODE" and key in ("children", "left", "right"):
                for child in value if isinstance(value, list) else [value]:
                    if child is not None:
                        self.query_node(child, scope)
            else:
                self.expression(value, scope)

    def table_ref(
        self, ref: Mapping[str, Any], visible: frozenset[str], owner: Mapping[str, Any]
    ) -> None:
        kind = ref.get("type")
        handled = {"type", "alias", "query_location", "query_location_length", "sample"}
        self.expression(ref.get("sample"), visible)
        if kind == "BASE_TABLE":
            self._base_table(ref, visible, owner)
            return  # its other fields are names and an AT clause, checked there
        if kind == "SUBQUERY":
            self.query_node(ref["subquery"]["node"], visible)
            handled |= {"subquery"}
        elif kind == "JOIN":
            self.table_ref(ref["left"], visible, owner)
            self.table_ref(ref["right"], visible, owner)
            handled |= {"left", "right"}
        elif kind == "TABLE_FUNCTION":
            function = ref.get("function") or {}
            if function.get("function_name") != "unnest":
                raise refused(f"table function {function.get('function_name')!r} is not allowed")
        elif kind not in ("EXPRESSION_LIST", "EMPTY"):
            raise refused(f"{str(kind).replace('_', ' ').lower()} is not allowed in FROM")
        for key, value in ref.items():
            if key not in handled:
                self.expression(value, visible)

    def _base_table(
        self, ref: Mapping[str, Any], visible: frozenset[str], owner: Mapping[str, Any]
    ) -> None:
        name = str(ref.get("table_name", ""))
        schema, catalog = ref.get("schema_name", ""), ref.get("catalog_name", "")
        if ref.get("at_clause") is not None:
            raise refused("AT (time travel) is not allowed")
        if not schema and not catalog and name.lower() in visible:
            return  # one of the query's own CTEs
        is_scan = (
            (schema, catalog, name) == ("main", "", TABLE)
            and ref.get("alias") == self.query.scan_alias
            and self._filters_tenant(owner)
        )
        if not is_scan:
            raise refused(f"table {name!r} is not allowed")

    def _filters_tenant(self, select: Mapping[str, Any]) -> bool:
        where = select.get("where_clause")
        if self.scope.tenant_id is None:
            return where is None
        return (
            isinstance(where, Mapping)
            and where.get("type") == "COMPARE_EQUAL"
            and where["left"].get("column_names") == [self.query.scan_alias, "tenant_id"]
            and where["right"].get("class") == "PARAMETER"
            and where["right"].get("identifier") == _TENANT_PARAM
        )

    def expression(self, value: Any, visible: frozenset[str]) -> None:
        if isinstance(value, list):
            for item in value:
                self.expression(item, visible)
            return
        if not isinstance(value, Mapping):
            return
        kind = value.get("class")
        if kind is None:
            shape = value.get("type")
            if _is_query_node(value) or (isinstance(shape, str) and shape in _TABLE_REF_TYPES):
                raise refused("a table or query is not allowed here")
        else:
            if kind not in _EXPRESSION_CLASSES:
                raise refused(f"{str(kind).lower()} expressions are not allowed")
            if "function_name" in value:
                name = str(value["function_name"]).lower()
                if value.get("schema") or value.get("catalog") or name not in ALLOWED_FUNCTIONS:
                    raise refused(f"function {value['function_name']!r} is not allowed")
            if kind == "PARAMETER" and value.get("identifier") not in self.query.params:
                raise refused("parameters are not allowed")
            if kind == "SUBQUERY":
                self.query_node(value["subquery"]["node"], visible)
                for key, child in value.items():
                    if key != "subquery":
                        self.expression(child, visible)
                return
        for child in value.values():
            self.expression(child, visible)


# --- step 2b: refusing without running ------------------------------------------------


def check(store: EventStore, scope: Scope, sql: str) -> None:
    """Refuses what `execute` would refuse, without running the query (for reports)."""
    verify(store, rewrite(sql, scope), scope)


# --- execution -----------------------------------------------------------------------


def _page_hash(scope: Scope, sql: str) -> str:
    digest = hashlib.sha256(f"{scope.tenant_id or ''}\x00{sql}".encode()).hexdigest()
    return digest[:24]


def encode_page_token(scope: Scope, sql: str, offset: int) -> str:
    body = json.dumps({"v": 1, "o": offset, "h": _page_hash(scope, sql)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_page_token(scope: Scope, sql: str, token: str) -> int:
    """The offset a token continues from; `INVALID_PAGE_TOKEN` unless it was issued for
    this SQL and tenant."""
    if not token:
        return 0
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset, digest = body["o"], body["h"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise bad_page_token("malformed page token") from exc
    if body.get("v") != 1 or not isinstance(offset, int) or offset < 0:
        raise bad_page_token("malformed page token")
    if digest != _page_hash(scope, sql):
        raise bad_page_token("the page token belongs to another query")
    return offset


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        # Clients read numbers as doubles: beyond 2^53 they would silently change.
        return value if abs(value) <= 2**53 else str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # Arrow maps arrive as lists of (key, value) pairs.
        return [_json_value(v) for v in value]
    return str(value)


@contextlib.contextmanager
def _cursor(store: EventStore) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """A cursor of the store's database that can be interrupted, or None for stores
    that do not offer one (then the deadline cannot stop the query, only the wait).

    `DuckDBEventStore.reader()` counts the cursor as an active reader until the block
    ends, so the store's `close` waits for a query still running here.
    """
    if not isinstance(store, DuckDBEventStore):
        yield None
        return
    with store.reader() as cursor:
        yield cursor


def _run(
    store: EventStore, sql: str, params: dict[str, object], timeout: timedelta
) -> tuple[list[str], list[str], pa.Table]:
    """(names, DuckDB types, rows) of a SELECT, interrupted at the deadline."""
    with _cursor(store) as cursor:
        if cursor is None:
            table = store.read(sql, params)
            return table.column_names, [str(t) for t in table.schema.types], table
        statements = cursor.extract_statements(sql)
        if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
            raise refused("send exactly one SELECT statement")
        timer = threading.Timer(timeout.total_seconds(), cursor.interrupt)
        timer.daemon = True
        timer.start()
        try:
            relation = cursor.sql(sql, params=params)
            names, types = list(relation.columns), [str(t) for t in relation.types]
            return names, types, relation.to_arrow_table()
        except duckdb.InterruptException as exc:
            raise timed_out(timeout) from exc
        finally:
            timer.cancel()


def execute(store: EventStore, scope: Scope, sql: str, options: QueryOptions) -> QueryResult:
    """Checks, rewrites and runs the caller's SQL; one page of its result."""
    offset = decode_page_token(scope, sql, options.page_token)
    query = rewrite(sql, scope)
    verify(store, query, scope)
    paged = (
        f"SELECT * FROM ({query.sql}) AS {RESERVED_PREFIX}_page"
        f" LIMIT {options.page_size + 1} OFFSET {offset}"
    )
    try:
        names, types, table = _run(store, paged, query.params, options.timeout)
    except duckdb.OutOfMemoryException as exc:
        raise AnalyticsError(
            StatusCode.RESOURCE_EXHAUSTED,
            "REQUEST_TOO_LARGE",
            "the query needs more memory than the server allows; aggregate more or read less",
        ) from exc
    except duckdb.Error as exc:
        raise AnalyticsError(
            StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            f"the query failed: {str(exc).splitlines()[0][:500]}",
        ) from exc
    # Column by column: names may repeat (`SELECT 1 AS a, 2 AS a`).
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows = [tuple(_json_value(v) for v in row) for row in zip(*columns, strict=True)]
    more = len(rows) > options.page_size
    return QueryResult(
        columns=tuple(ResultColumn(n, t) for n, t in zip(names, types, strict=True)),
        rows=tuple(rows[: options.page_size]),
        next_page_token=(encode_page_token(scope, sql, offset + options.page_size) if more else ""),
    )
