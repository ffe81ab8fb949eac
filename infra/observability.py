"""Observability for every component: Prometheus metrics, the metrics endpoint, structured logs.

Metrics (prometheus_client, the process-wide default registry) are defined here, once, and
recorded where the work happens; docs/operations.md lists each with its labels and what
an operator reads from it. Every name is ``hisam_<component>_<what>_<unit>``: seconds for
durations (Prometheus' base unit; the bucket bounds below are in the millisecond range where
the component lives there), ``_total`` on counters (prometheus_client appends it), ``_ratio``
for values in [0, 1]. Each component's process serves its own ``/metrics`` with
``--metrics-port`` (0: off, the default) on ``--metrics-addr`` (127.0.0.1; a pod sets 0.0.0.0
so Prometheus can scrape it).

Logs. ``configure_logging`` replaces ``logging.basicConfig`` in hisam/cli.py: ``--log-format
text`` (the default) keeps the human format; ``json`` (or ``HISAM_LOG_FORMAT=json``) writes
one JSON object per line: ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``msg``,
every ``extra={...}`` field of the call, and ``exc`` with the traceback when there is one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# --- buckets (seconds) -------------------------------------------------------------------------

# Rank and one Triton call: a warm Rank is a few ms on a CPU, a cold one tens of ms, and a
# request stuck behind a deadline seconds.
LATENCY_BUCKETS_S = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Event time -> store write: tens of ms when the worker keeps up, minutes in a backlog.
FRESHNESS_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
# Whole batches and training steps.
BATCH_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Gate passed -> Triton serves the version (export, parity, copy, Triton's poll and load).
PUBLISH_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
CANDIDATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 300, 500, 1000, 2000)

# --- serving ---------------------------------------------------------------------------------------

RANK_REQUESTS = Counter("hisam_serving_rank_requests", "Rank calls by gRPC status code.", ["code"])
RANK_LATENCY = Histogram(
    "hisam_serving_rank_latency_seconds",
    "Time to answer a Rank call in the server (read + model + sort), by gRPC status code.",
    ["code"],
    buckets=LATENCY_BUCKETS_S,
)
RANK_IN_FLIGHT = Gauge("hisam_serving_rank_in_flight_requests", "Rank calls being answered now.")
RANK_CANDIDATES = Histogram(
    "hisam_serving_rank_candidates_per_request", "Candidates in one Rank request.", buckets=CANDIDATE_BUCKETS
)
RANK_ITEMS = Counter(
    "hisam_serving_rank_items",
    "Items in Rank answers by status (scored, unknown_item, tokenizer_mismatch).",
    ["status"],
)
SERVING_MODEL_VERSION = Gauge(
    "hisam_serving_model_version_info",
    "1 for the model content version that answered the last scored Rank call.",
    ["model_version"],
)
BACKEND_LATENCY = Histogram(
    "hisam_serving_backend_latency_seconds",
    "One successful inference call, by backend (triton, ort) and graph.",
    ["backend", "graph"],
    buckets=LATENCY_BUCKETS_S,
)
BACKEND_ERRORS = Counter(
    "hisam_serving_backend_errors",
    "Failed inference calls by backend, graph and kind (unavailable, deadline, error).",
    ["backend", "graph", "kind"],
)
STORE_READ_LATENCY = Histogram(
    "hisam_serving_store_read_latency_seconds",
    "One online-store read for Rank (user_stream, item_sids; ping: the health probe).",
    ["read"],
    buckets=LATENCY_BUCKETS_S,
)
STORE_ERRORS = Counter("hisam_serving_store_errors", "Failed online-store reads for Rank.", ["read"])
CACHE_LOOKUPS = Counter(
    "hisam_serving_cache_lookups",
    "Cache lookups: anchor (KV cache, one per scored request) and item (semantic IDs, one per candidate).",
    ["cache", "result"],
)
ANCHOR_CACHE_BYTES = Gauge("hisam_serving_anchor_cache_bytes", "Bytes held by the anchor KV cache.")
ANCHOR_CACHE_ENTRIES = Gauge("hisam_serving_anchor_cache_entries", "Users held by the anchor KV cache.")
ANCHOR_CACHE_DELETIONS = Counter(
    "hisam_serving_anchor_cache_deletions", "Tombstones of deleted users applied to the anchor KV cache."
)
DEPENDENCY_UP = Gauge(
    "hisam_serving_dependency_up", "1 while the health probe finds the dependency answering.", ["dependency"]
)

# --- stream worker ---------------------------------------------------------------------------------

STREAM_ACTIONS_CONSUMED = Counter("hisam_stream_actions_consumed", "Records read from user-actions.")
STREAM_ITEMS_CONSUMED = Counter("hisam_stream_items_consumed", "Records read from item-events.")
STREAM_ACTIONS_APPENDED = Counter("hisam_stream_actions_appended", "Actions appended to a user's stream.")
STREAM_ACTION_DUPLICATES = Counter(
    "hisam_stream_action_duplicates", "Redelivered actions recognised by event id and not appended again."
)
STREAM_ITEMS_WRITTEN = Counter("hisam_stream_items_written", "Items whose semantic IDs were written.")
STREAM_SAMPLES_PRODUCED = Counter("hisam_stream_samples_produced", "Training samples sent (acknowledged).")
STREAM_DEAD_LETTERS = Counter(
    "hisam_stream_dead_letters", "Records sent to the dead-letter topic, by reason.", ["reason"]
)
STREAM_DEAD_LETTERS_SHRUNK = Counter(
    "hisam_stream_dead_letters_shrunk",
    "Dead letters the broker refused for their size and that were sent again without their value.",
)
STREAM_DEAD_LETTERS_DROPPED = Counter(
    "hisam_stream_dead_letters_dropped",
    "Dead letters the broker refused even without their value: logged (critical) and dropped, so that "
    "they never stop their partition. Any increase needs an operator.",
)
STREAM_USERS_DELETED = Counter(
    "hisam_stream_users_deleted", "Users whose state a deletion removed (per namespace deleted from).", ["project"]
)
STREAM_ACTIONS_OF_DELETED_USERS = Counter(
    "hisam_stream_actions_of_deleted_users", "Actions dropped: their user was deleted within the grace period."
)
STREAM_TOMBSTONES = Counter("hisam_stream_tombstones", "Tombstones of deleted users sent (acknowledged).")
STREAM_BATCH_LATENCY = Histogram(
    "hisam_stream_batch_latency_seconds",
    "One batch: process (store write) and emit (outputs acknowledged), by agent (actions, items).",
    ["agent"],
    buckets=BATCH_BUCKETS_S,
)
STREAM_FRESHNESS = Histogram(
    "hisam_stream_freshness_seconds",
    "Produce time (the record's Kafka timestamp) to visible in the online store, by agent (actions, items).",
    ["agent"],
    buckets=FRESHNESS_BUCKETS_S,
)
STREAM_CONSUMER_LAG = Gauge(
    "hisam_stream_consumer_lag_records", "Records behind the end of the partition.", ["topic", "partition"]
)

# --- near-line trainer -----------------------------------------------------------------------------

TRAINER_SAMPLES_CONSUMED = Counter("hisam_trainer_samples_consumed", "Records read from training-samples.")
TRAINER_SAMPLES_TRAINED = Counter("hisam_trainer_samples_trained", "Samples tested and trained on.")
TRAINER_SAMPLE_DUPLICATES = Counter("hisam_trainer_sample_duplicates", "Samples skipped as already trained on.")
TRAINER_SAMPLES_REJECTED = Counter(
    "hisam_trainer_samples_rejected", "Samples dead-lettered by the trainer, by reason.", ["reason"]
)
TRAINER_SAMPLES_OF_DELETED_USERS = Counter(
    "hisam_trainer_samples_of_deleted_users", "Samples skipped: their user was deleted (a tombstone) after them."
)
TRAINER_STEP_LATENCY = Histogram(
    "hisam_trainer_step_latency_seconds", "One optimiser step (forward, backward, update).", buckets=BATCH_BUCKETS_S
)
TRAINER_BATCH_LATENCY = Histogram(
    "hisam_trainer_batch_latency_seconds",
    "One micro-batch end to end (test, train, gate, snapshot, commit).",
    buckets=BATCH_BUCKETS_S,
)
TRAINER_AUC = Gauge("hisam_trainer_prequential_auc_ratio", "Prequential AUC over the rolling window.", ["model"])
TRAINER_GAUC = Gauge("hisam_trainer_prequential_gauc_ratio", "Prequential GAUC over the rolling window.", ["model"])
TRAINER_GATE_DECISIONS = Counter("hisam_trainer_gate_decisions", "Gate decisions by outcome.", ["outcome"])
TRAINER_PUBLISHES = Counter("hisam_trainer_publishes", "Versions published to the model repository.")
TRAINER_PUBLISHED_VERSION = Gauge(
    "hisam_trainer_published_version", "Repository version number the trainer serves (after publishes and rollbacks)."
)
TRAINER_PUBLISH_LATENCY = Histogram(
    "hisam_trainer_publish_latency_seconds", "Gate passed to Triton serving the version.", buckets=PUBLISH_BUCKETS_S
)
TRAINER_ROLLBACKS = Counter(
    "hisam_trainer_rollbacks", "Versions withdrawn, by trigger (probation, external).", ["trigger"]
)
TRAINER_CONSUMER_LAG = Gauge(
    "hisam_trainer_consumer_lag_records", "Records of training-samples not yet committed.", ["topic", "partition"]
)

_version_lock = threading.Lock()
_served_version: list[str] = [""]  # the label SERVING_MODEL_VERSION carries now


def set_serving_model_version(version: str) -> None:
    """Point ``hisam_serving_model_version_info`` at ``version`` (no-op for "" or the current one)."""
    if not version or version == _served_version[0]:
        return
    with _version_lock:
        old = _served_version[0]
        if version == old:
            return
        if old:
            SERVING_MODEL_VERSION.remove(old)
        SERVING_MODEL_VERSION.labels(model_version=version).set(1)
        _served_version[0] = version


# --- the /metrics endpoint -------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """prometheus_client's HTTP server, serving the default registry on ``addr:port``."""

    addr: str
    port: int
    _httpd: object = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """A Prometheus text page as {(sample name, sorted (label, value) pairs): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@contextlib.contextmanager
def metrics_server(port: int, addr: str = "127.0.0.1") -> Iterator[MetricsServer | None]:
    """Serve ``/metrics`` on addr:port in a daemon thread for a ``with`` body, closed after it.

    Port 0 means disabled: the body gets None.
    """
    if not port:
        yield None
        return
    httpd, thread = start_http_server(port, addr)
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", addr, port)
    server = MetricsServer(addr, port, httpd, thread)
    try:
        yield server
    finally:
        server.close()


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port`` (0: off) and ``--metrics-addr``, defaulting to HISAM_METRICS_PORT / _ADDR."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("HISAM_METRICS_PORT", "0")),
        help="serve Prometheus /metrics on this port (0: off)",
    )
    parser.add_argument(
        "--metrics-addr",
        default=os.environ.get("HISAM_METRICS_ADDR", "127.0.0.1"),
        help="address of the /metrics endpoint (0.0.0.0 in a pod)",
    )


# --- structured logs -------------------------------------------------------------------------------

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the call's extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="log lines as text or one JSON object per line (default: $HISAM_LOG_FORMAT, else text)",
    )


def configure_logging(verbose: bool = False, log_format: str | None = None) -> None:
    """The root logger for a command: DEBUG with ``verbose``, else INFO, to stderr in ``log_format``."""
    fmt = log_format or os.environ.get("HISAM_LOG_FORMAT") or "text"
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} (from HISAM_LOG_FORMAT?) is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
