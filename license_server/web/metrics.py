"""Prometheus metrics: one registry per daemon; no license keys, machine codes or addresses as labels."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from license_server import __version__
from license_server.audit.writer import AuditState
from license_server.licensing.upstream import BreakerState

if TYPE_CHECKING:
    from license_server.licensing.policy import Outcome
    from license_server.reports.runway import Outlook

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BREAKER = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class Metrics:
    """The counters the daemon updates as it works, and what it reads out at scrape time."""

    def __init__(self, allowed_methods: Iterable[str], *, node: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._methods = frozenset(allowed_methods)
        self._calls = _CallStats((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.registry.register(self._calls)
        self.upstream = Counter(
            "license_server_upstream_requests",
            "Calls sent upstream, by outcome (answered, refused, or why it failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "license_server_upstream_latency_seconds",
            "Time upstream took to answer.",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.upstream_retries = Counter(
            "license_server_upstream_retries",
            "Calls sent upstream a second time: the first try never left, or a call that only reads failed.",
            registry=self.registry,
        )
        self.admin_auth_failures = Counter(
            "license_server_admin_auth_failures",
            "Wrong admin tokens sent to the console, by how: the login form or a bearer token.",
            ["via"],
            registry=self.registry,
        )
        for via in ("login", "bearer"):
            self.admin_auth_failures.labels(via=via)
        self.admin_auth_throttled = Counter(
            "license_server_admin_auth_throttled",
            "Admin token attempts answered 429 without being checked: their address failed too often.",
            registry=self.registry,
        )
        Info("license_server_build", "The daemon's version.", registry=self.registry).info(
            {"version": __version__}
        )
        if node is not None:  # which node of several answers this scrape: license_server_node_info{node=...}
            Info("license_server_node", "This node's name (node.name).", registry=self.registry).info(
                {"node": node}
            )

    def count_call(self, method: str | None, action: str, status: int, elapsed: float) -> None:
        """Count one answered call and its latency."""
        self._calls.add((self.method_label(method), action, status), elapsed)

    def count_upstream(self, outcome: Outcome) -> None:
        """Count what came of asking upstream for an answer, if it was asked: how it ended, latency, retry."""
        if outcome.upstream_latency is not None:
            self.upstream_latency.observe(outcome.upstream_latency)
            self.upstream.labels("answered" if outcome.result == 0 else "refused").inc()
        elif outcome.failure_kind is not None:
            self.upstream.labels(outcome.failure_kind).inc()
        if outcome.retried:
            self.upstream_retries.inc()

    def allow_methods(self, methods: Iterable[str]) -> None:
        """Follow a reloaded method allowlist for the api_method label."""
        self._methods = frozenset(methods)

    def method_label(self, method: str | None) -> str:
        """An API method as a label value: allowlisted methods by name, anything else lumped together."""
        if method is None:
            return "not_api"
        return method if method in self._methods else "other"

    def watch(self, read: Callable[[], Snapshot]) -> None:
        """Add the gauges read from the running daemon at each scrape."""
        self.registry.register(_StateCollector(read))

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _CallStats(Collector):
    """Calls by label set and their latency histogram, as plain numbers turned into metrics at scrape time.

    prometheus_client's Counter and Histogram take a lock and walk the buckets in Python on every call; the
    daemon counts on its event loop only, where a dict and a bisection do the same for a fraction of that.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._bound_labels = [repr(float(bound)) for bound in bounds]  # as prometheus_client writes "le"
        self._counts: dict[tuple[str, str, int], int] = {}
        self._buckets = [0] * (len(bounds) + 1)  # the last one past every bound: +Inf only
        self._sum = 0.0

    def add(self, labels: tuple[str, str, int], elapsed: float) -> None:
        """One call with these labels, answered in `elapsed` seconds."""
        counts = self._counts
        counts[labels] = counts.get(labels, 0) + 1
        self._buckets[bisect.bisect_left(self._bounds, elapsed)] += 1  # "le": a bound counts its own value
        self._sum += elapsed

    def collect(self) -> Iterable[Metric]:
        calls = CounterMetricFamily(
            "license_server_calls",
            "Workstation calls answered, by API method, what the daemon did, and HTTP status.",
            labels=["api_method", "action", "status"],
        )
        for (method, action, status), count in sorted(self._counts.items()):
            calls.add_metric([method, action, str(status)], count)
        yield calls
        cumulative = list(itertools.accumulate(self._buckets))
        # cumulative has one more count than there are bounds: the +Inf bucket's
        buckets = list(zip(self._bound_labels, cumulative, strict=False))
        yield HistogramMetricFamily(
            "license_server_call_latency_seconds",
            "The daemon's time to answer a workstation call, upstream included.",
            buckets=[*buckets, ("+Inf", cumulative[-1])],
            sum_value=self._sum,
        )


class Snapshot:
    """What a scrape reads from the running daemon."""

    __slots__ = (
        "audit",
        "audit_records",
        "breaker",
        "database_backlog",
        "database_up",
        "kept_answers",
        "live_nodes",
        "runway",
        "seats_by_product",
    )

    def __init__(
        self,
        *,
        breaker: BreakerState | None,
        audit: AuditState,
        audit_records: int,
        seats_by_product: dict[str, int],
        kept_answers: int,
        database_up: bool | None = None,
        live_nodes: int | None = None,
        database_backlog: tuple[int, int] | None = None,
        runway: Outlook | None = None,
    ) -> None:
        self.breaker = breaker
        self.database_up = database_up  # None: no shared database (SQLite in state_dir)
        self.live_nodes = live_nodes
        self.database_backlog = database_backlog  # (spooled writes, audit records not in the database)
        self.runway = runway  # None until first computed
        self.audit = audit
        self.audit_records = audit_records
        self.seats_by_product = seats_by_product
        self.kept_answers = kept_answers


class _StateCollector(Collector):
    """Gauges taken from the daemon's state when Prometheus scrapes."""

    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        state = self._read()
        breaker = GaugeMetricFamily(
            "license_server_upstream_breaker_state",
            "Circuit breaker towards upstream: 0 closed, 1 probing, 2 open; absent in offline mode.",
        )
        if state.breaker is not None:
            breaker.add_metric([], _BREAKER[state.breaker])
        yield breaker
        seats = GaugeMetricFamily(
            "license_server_floating_seats_in_use", "Live floating leases, by product.", labels=["product_id"]
        )
        for product, count in sorted(state.seats_by_product.items()):
            seats.add_metric([product], count)
        yield seats
        yield GaugeMetricFamily(
            "license_server_kept_answers",
            "Verified upstream answers kept for outages.",
            value=state.kept_answers,
        )
        yield GaugeMetricFamily(
            "license_server_audit_writable",
            "1 while the audit trail is being written.",
            value=int(state.audit.writable),
        )
        yield GaugeMetricFamily(
            "license_server_audit_backlog",
            "Audit records waiting in memory for the trail.",
            value=state.audit.backlog,
        )
        yield CounterMetricFamily(
            "license_server_audit_records",
            "Audit records written since the daemon started.",
            value=state.audit_records,
        )
        yield GaugeMetricFamily(
            "license_server_audit_sequence",
            "Sequence number of the newest audit record.",
            value=state.audit.seq,
        )
        if state.database_up is not None:
            yield GaugeMetricFamily(
                "license_server_database_up",
                "1 while this node's heartbeats reach the shared database, 0 while they do not.",
                value=int(state.database_up),
            )
        if state.live_nodes is not None:
            yield GaugeMetricFamily(
                "license_server_live_nodes",
                "Nodes seen by the shared database within the last 5 s, this one included, as of the last"
                " heartbeat that got through.",
                value=state.live_nodes,
            )
        if state.runway is not None:
            within = GaugeMetricFamily(
                "license_server_runway_machines",
                "Machines that would stop being licensed within this span if upstream were unreachable from"
                " now on (each counted in every span it is within).",
                labels=["within"],
            )
            for label, count in state.runway.within.items():
                within.add_metric([label], count)
            yield within
            shortest = GaugeMetricFamily(
                "license_server_runway_shortest_seconds",
                "Seconds until the product's first machine would stop being licensed without upstream.",
                labels=["product_id"],
            )
            for product, seconds in sorted(state.runway.shortest.items()):
                shortest.add_metric([product], round(seconds))
            yield shortest
        if state.database_backlog is not None:
            writes, records = state.database_backlog
            yield GaugeMetricFamily(
                "license_server_database_spooled_writes",
                "Writes waiting in this node's spool for the shared database.",
                value=writes,
            )
            yield GaugeMetricFamily(
                "license_server_audit_unshipped_records",
                "Audit records of this node not yet in the shared database.",
                value=records,
            )
