"""Observability of the Rank server: /metrics moves by exactly the calls made; logs are JSON.

The server is ``hisam serve`` as a process (conftest ``rank_service``: real Triton, a private
Redis, ``--metrics-port``, ``--log-format json``); the metrics are scraped over HTTP before and
after a known set of calls, and every delta is predicted from those calls alone. Users
whose streams this test writes, and whom no other test ranks, keep the anchor-cache and
inference counts exact: a user's first request encodes its history (a miss: encode_history
+ score_with_cache), a repeat with the same stream reuses it (a hit: score_with_cache only). infra/observability.py's helpers
(JSON formatter, metrics endpoint, ``--log-format`` on the CLI) are tested directly below.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import grpc
import pytest

from hisam_pb.v1 import rank_pb2, rank_pb2_grpc

FRESH_USERS = (900_001, 900_002)  # streams written here, never ranked by another test
UNKNOWN = 10**7  # no such item


def _value(page: dict, name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


@pytest.mark.triton
@pytest.mark.slow
def test_rank_metrics_move_by_exactly_the_calls_made(rank_service, scrape) -> None:
    from features.store import StreamAction, open_stream_store

    items = rank_service.data.items
    store = open_stream_store(rank_service.data.cfg)
    sids = store.read_item_sids(items[100:104])
    store.append_batch(
        [StreamAction(u, f"metrics-{u}-{t}", i, 1 + t, 10 + t, s.tokens) for u in FRESH_USERS for t, (i, s) in enumerate(sids.items())],
        want_history=False,
    )  # fmt: skip
    store.close()
    a, b = items[:12], items[40:47]
    ok_calls = [
        (FRESH_USERS[0], a),  # miss: encode + score
        (FRESH_USERS[0], a[::-1]),  # hit: the same (empty) stream, any candidate order
        (FRESH_USERS[0], [*a[:5], UNKNOWN]),  # hit, one unknown item
        (FRESH_USERS[1], b),  # miss
        (FRESH_USERS[1], [UNKNOWN + 1]),  # nothing to score: no cache lookup, no inference
    ]
    bad_calls = [(FRESH_USERS[0], []), (FRESH_USERS[0], [3, 3])]
    before = scrape(rank_service.metrics_url)
    with grpc.insecure_channel(rank_service.address) as ch:
        stub = rank_pb2_grpc.RankingServiceStub(ch)
        answers = [stub.Rank(rank_pb2.RankRequest(user_id=u, item_ids=c), timeout=30) for u, c in ok_calls]
        for u, c in bad_calls:
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(rank_pb2.RankRequest(user_id=u, item_ids=c), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(rank_service.metrics_url)
    d = lambda name, **labels: _delta(before, after, name, **labels)

    assert [x.cache_hit for x in answers] == [False, True, True, False, False]
    assert [x.history_len for x in answers] == [4] * len(ok_calls)
    assert d("hisam_serving_rank_requests_total", code="OK") == len(ok_calls)
    assert d("hisam_serving_rank_requests_total", code="INVALID_ARGUMENT") == len(bad_calls)
    assert d("hisam_serving_rank_latency_seconds_count", code="OK") == len(ok_calls)
    assert d("hisam_serving_rank_latency_seconds_bucket", code="OK", le="+Inf") == len(ok_calls)
    assert d("hisam_serving_rank_latency_seconds_count", code="INVALID_ARGUMENT") == len(bad_calls)
    assert d("hisam_serving_rank_latency_seconds_sum", code="OK") > 0
    all_calls = ok_calls + bad_calls
    assert d("hisam_serving_rank_candidates_per_request_count") == len(all_calls)
    assert d("hisam_serving_rank_candidates_per_request_sum") == sum(len(c) for _, c in all_calls)
    scored = sum(len(c) for _, c in ok_calls) - 2
    assert d("hisam_serving_rank_items_total", status="scored") == scored
    assert d("hisam_serving_rank_items_total", status="unknown_item") == 2
    assert d("hisam_serving_cache_lookups_total", cache="anchor", result="miss") == 2
    assert d("hisam_serving_cache_lookups_total", cache="anchor", result="hit") == 2
    item_lookups = d("hisam_serving_cache_lookups_total", cache="item", result="hit") + d(
        "hisam_serving_cache_lookups_total", cache="item", result="miss"
    )
    assert item_lookups == sum(len(c) for _, c in ok_calls)  # invalid requests never reach the store
    latency = "hisam_serving_backend_latency_seconds_count"
    assert d(latency, backend="triton", graph="encode_history") == 2
    assert d(latency, backend="triton", graph="score_with_cache") == 4
    assert d(latency, backend="triton", graph="ranking") == 0
    assert d("hisam_serving_store_read_latency_seconds_count", read="user_stream") == len(ok_calls)
    versions = {
        dict(labels)["model_version"]: v for (n, labels), v in after.items() if n == "hisam_serving_model_version_info"
    }
    assert versions == {answers[0].model_version: 1.0}
    assert _value(after, "hisam_serving_rank_in_flight_requests") == 0
    assert _value(after, "hisam_serving_dependency_up", dependency="backend") == 1
    assert _value(after, "hisam_serving_dependency_up", dependency="store") == 1


@pytest.mark.triton
@pytest.mark.slow
def test_serve_logs_one_json_object_per_line(rank_service) -> None:
    lines = rank_service.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    health = [r for r in records if r["logger"] == "serving.server" and r.get("health") == "SERVING"]
    assert health and health[0]["level"] == "INFO" and health[0]["msg"].startswith("health: SERVING")
    assert any(r["logger"] == "infra.observability" and "metrics on http" in r["msg"] for r in records)


def test_json_formatter_writes_extra_fields_and_the_exception() -> None:
    from infra.observability import JsonFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("hisam.test.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("rank %s failed", "r1", extra={"request_id": "r1", "code": "INTERNAL", "n": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("with a traceback")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "WARNING" and first["logger"] == "hisam.test.json" and first["msg"] == "rank r1 failed"
    assert (first["request_id"], first["code"], first["n"]) == ("r1", "INTERNAL", 3)
    assert first["ts"].endswith("Z") and "T" in first["ts"] and "exc" not in first
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


def test_log_format_comes_from_the_option_or_the_environment(monkeypatch) -> None:
    from hisam.cli import _match, build_parser
    from infra.observability import JsonFormatter, configure_logging

    # "--log-format json" before the command: the command is still found and parsed.
    argv = ["--log-format", "json", "rank", "7", "1", "2"]
    assert _match(argv) == ("rank", "hisam.jobs.rank")
    args = build_parser(_match(argv)).parse_args(argv)
    assert args.log_format == "json" and args.items == [1, 2]
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        for option, env, want in ((None, "json", JsonFormatter), ("text", "json", logging.Formatter)):
            root.handlers.clear()
            monkeypatch.setenv("HISAM_LOG_FORMAT", env)
            configure_logging(False, option)
            assert type(root.handlers[0].formatter) is want
        monkeypatch.setenv("HISAM_LOG_FORMAT", "yaml")
        with pytest.raises(ValueError, match="not one of text, json"):
            configure_logging(False, None)
    finally:
        root.handlers[:] = saved


def test_metrics_server_serves_the_registry_and_port_zero_disables_it() -> None:
    from infra import observability as obs
    from infra.ports import free_port

    with obs.metrics_server(0) as off:
        assert off is None
    with obs.metrics_server(free_port()) as server:
        obs.set_serving_model_version("hmat-test-a")
        obs.set_serving_model_version("hmat-test-b")
        with urllib.request.urlopen(server.url, timeout=10) as r:
            text = r.read().decode()
    with pytest.raises(OSError):  # closed with the block
        urllib.request.urlopen(server.url, timeout=5)
    assert 'hisam_serving_model_version_info{model_version="hmat-test-b"} 1.0' in text
    page = obs.parse_metrics(text)
    assert page[("hisam_serving_model_version_info", (("model_version", "hmat-test-b"),))] == 1.0
    assert "hmat-test-a" not in text  # the old version's series is gone, not left at 1
    assert "# HELP hisam_trainer_gate_decisions_total" in text and "# HELP hisam_stream_freshness_seconds" in text
