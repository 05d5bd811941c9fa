"""Prometheus metrics: what was served, refused and spent, by client and model.

Metrics are always counted (in a registry of this daemon's own) and served over
HTTP only when `metrics.listen` is set; the endpoint has no authentication, so
it belongs on loopback or behind the operator's scraper network.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vibectld.service.staleness import StorageState

log = structlog.get_logger("vibectld")

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class FeedCounts(Protocol):
    """What the change feed's listener counts (store/listener.py, FeedListener)."""

    @property
    def failures(self) -> int: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def reloads(self) -> int: ...
    @property
    def connected(self) -> bool: ...


class _FeedCollector:
    """The change feed's listener, read at each scrape. Its counts are the listener's own
    ints (one writer, its thread), so they are exposed as they are instead of being
    copied into Counters on every change; they restart at 0 with the process, as a
    Counter's would. Without a listener (sqlite, which no other node writes) there is
    nothing to show: a `vibectld_feed_connected 0` there would read as an outage."""

    def __init__(self) -> None:
        self.source: Callable[[], FeedCounts | None] = lambda: None

    def collect(self) -> Iterator[Metric]:
        feed = self.source()
        if feed is None:
            return
        yield CounterMetricFamily(
            "vibectld_feed_failures",
            "Times the change feed's listener lost its PostgreSQL connection or failed to "
            "open one (each followed by a retry with backoff).",
            value=feed.failures,
        )
        yield CounterMetricFamily(
            "vibectld_feed_reconnects",
            "Times the change feed's listener connected and caught up again after a failure.",
            value=feed.reconnects,
        )
        yield CounterMetricFamily(
            "vibectld_feed_reloads",
            "Times the listener read every client again because the feed rows it missed "
            "had been pruned.",
            value=feed.reloads,
        )
        yield GaugeMetricFamily(
            "vibectld_feed_connected",
            "1 while the change feed's listener is connected and caught up.",
            value=float(feed.connected),
        )


class Metrics:
    """This daemon's metrics. Each is declared whole where it is built (name, help,
    labels), so the declarations look alike on purpose: each reads as a scraper sees it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._add_call_metrics(self.registry)
        self._add_limit_metrics(self.registry)
        self._add_storage_metrics(self.registry)
        # Labelled children, looked up once: .labels() costs more than the increment.
        self._children: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self._redaction_children: dict[tuple[str, str], Any] = {}
        self._server: Any = None
        # The bound port of the HTTP endpoint, once serving.
        self.port: int | None = None
        self._thread: threading.Thread | None = None

    def _add_call_metrics(self, r: CollectorRegistry) -> None:
        """What calls did: served, refused, in flight, how long, tokens, secrets found."""
        self.requests = Counter(
            "vibectld_requests",
            "Calls that reached a model, by outcome (ok or an in-band error code).",
            ["client", "model", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "vibectld_refusals",
            "Calls refused before reaching a model, by reason.",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge("vibectld_in_flight", "Calls in progress.", registry=r)
        self.duration = Histogram(
            "vibectld_request_duration_seconds",
            "Time from call start to its last byte, for calls that reached a model.",
            ["model"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "vibectld_tokens",
            "Tokens reported by models.",
            ["client", "model", "direction"],
            registry=r,
        )
        # No client label: per client and kind, `vibectl-admin usage` has them. `kind` is
        # bounded by the detector table and the configured custom rules.
        self.redactions = Counter(
            "vibectld_redactions",
            "Secrets the server's redaction policy found in prompts, by kind and action "
            "(redacted: replaced before the model; refused: the call was refused).",
            ["kind", "action"],
            registry=r,
        )

    def _add_limit_metrics(self, r: CollectorRegistry) -> None:
        """The cluster limiter (service/cluster_limits.py), on storage.backend: postgresql."""
        self.limit_round_trips = Counter(
            "vibectld_limit_round_trips",
            "Round trips to PostgreSQL for cluster-wide limits, by step (admit: a call's rpm "
            "and concurrency; release: finished calls' leases no call carried; tick) and "
            "result (ok, failed, timeout).",
            ["step", "result"],
            registry=r,
        )
        self.limit_fallbacks = Counter(
            "vibectld_limit_fallbacks",
            "Calls whose rpm and concurrency this node decided alone (each node enforcing "
            "its share of a client's limits), by why (stale: this node's view of the store "
            "is stale; unavailable: the limiter's database did not answer in time; "
            "name_in_use: another node took this node's server.name).",
            ["reason"],
            registry=r,
        )

    def _add_storage_metrics(self, r: CollectorRegistry) -> None:
        """The store, read when scraped (storage.on_stale in vibectld.yaml(5)); until
        `watch_storage` binds them they read 0."""
        self.storage_degraded = Gauge(
            "vibectld_storage_degraded",
            "1 while the store's database does not answer (admin changes are refused).",
            registry=r,
        )
        self.storage_stale = Gauge(
            "vibectld_storage_stale",
            "1 while this node's view of the shared store is older than "
            "storage.max_staleness (it follows storage.on_stale).",
            registry=r,
        )
        self.storage_view_age = Gauge(
            "vibectld_storage_view_age_seconds",
            "Seconds since this node's view of other nodes' changes was brought up to "
            "date (0 for sqlite, which no other node writes).",
            registry=r,
        )
        self.usage_buffered_calls = Gauge(
            "vibectld_usage_buffered_calls",
            "Calls served and counted in memory, not yet written to the database.",
            registry=r,
        )
        # The change feed's listener (postgresql): how often its connection was lost and
        # replaced. How long ago it last caught up is vibectld_storage_view_age_seconds.
        self._feed = _FeedCollector()
        r.register(self._feed)

    def observe_call(
        self,
        client: str,
        model: str,
        outcome: str,
        seconds: float,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> None:
        key = (client, model, outcome)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(client, model, outcome),
                self.duration.labels(model),
                self.tokens.labels(client, model, "input"),
                self.tokens.labels(client, model, "output"),
            )
            self._children[key] = children
        requests, duration, tokens_in, tokens_out = children
        requests.inc()
        duration.observe(seconds)
        if input_tokens:
            tokens_in.inc(input_tokens)
        if output_tokens:
            tokens_out.inc(output_tokens)

    def observe_redactions(self, found: Mapping[str, int], action: str) -> None:
        for kind, n in found.items():
            child = self._redaction_children.get((kind, action))
            if child is None:
                child = self._redaction_children[kind, action] = self.redactions.labels(
                    kind, action
                )
            child.inc(n)

    def watch_storage(self, state: Callable[[], StorageState]) -> None:
        """Read the storage gauges from `state` (memory only) at each scrape."""
        self.storage_degraded.set_function(lambda: float(state().degraded))
        self.storage_stale.set_function(lambda: float(state().stale))
        self.storage_view_age.set_function(lambda: state().view_age or 0.0)
        self.usage_buffered_calls.set_function(lambda: float(state().buffered_calls))

    def watch_feed(self, feed: Callable[[], FeedCounts | None]) -> None:
        """Read the change feed's counts from `feed()` (None: no listener) at each scrape."""
        self._feed.source = feed

    def serve(self, listen: str) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            if not ipaddress.ip_address(host).is_loopback:
                log.warning(
                    "metrics.not_loopback",
                    listen=listen,
                    hint="the metrics endpoint has no authentication; prefer 127.0.0.1",
                )
        except ValueError:
            pass
        self._server, self._thread = start_http_server(int(port), host, self.registry)
        self.port = int(self._server.server_address[1])
        log.info("metrics.listening", address=f"{host}:{self.port}")
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._server = None
