"""A bounded load test: 16 concurrent gRPC clients on the real Rank server + Triton for 60 s.

``hisam serve`` runs as its own process on a real ``tritonserver`` and a private Redis
(conftest ``rank_service``); ``serving.load.rank_load`` runs the clients, each on its own
channel, back to back. What is asserted is correctness under concurrency, not speed: not one
error, every answer well-formed (``serving.load.check_answer``: each candidate once, sorted,
finite scores, the model version), and every answer's scores equal to the same request
ranked in this process by ONNX Runtime on the same graphs and store (1e-4: the tolerance of
ONNX Runtime in Triton's stub against the venv's, tests/export/test_hmat_export.py), and the
server's own request counter moved by exactly the calls made. The p50/p99 are printed and
written to ``rank_load.json`` in the test's tmp dir with the load average: on a shared CI
machine they are a record, not a threshold.

``HISAM_LOAD_SECONDS`` (default 60) and ``HISAM_LOAD_CLIENTS`` (default 16) change the run.
"""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest

from serving.load import rank_load

pytestmark = [pytest.mark.triton, pytest.mark.slow]

LOAD_SECONDS = float(os.environ.get("HISAM_LOAD_SECONDS", "60"))
LOAD_CLIENTS = int(os.environ.get("HISAM_LOAD_CLIENTS", "16"))
ATOL = 1e-4


def _reference(service) -> tuple[dict[int, dict[int, float]], str]:
    """Scores of every request by an in-process ONNX Runtime ranker on the same repository and store."""
    from features.store import open_stream_store
    from serving.backends import OrtBackend
    from serving.online import OnlineReader
    from serving.profiles import Profiles
    from serving.ranking import Ranker, model_info

    async def go():
        ranker = Ranker(
            OrtBackend(service.repo),
            OnlineReader(open_stream_store(service.data.cfg)),
            Profiles.empty(),  # what `hisam serve` without --checkpoint uses
            model_info(service.repo),
            cache_bytes=0,
        )
        try:
            results = [await ranker.rank(u, items) for u, items in service.data.requests]
        finally:
            await ranker.backend.close()
        return results

    results = asyncio.run(go())
    return {k: {i.item_id: i.score for i in r.items} for k, r in enumerate(results)}, results[0].model_version


def _counter(page: dict, code: str) -> float:
    return page.get(("hisam_serving_rank_requests_total", (("code", code),)), 0.0)


def test_concurrent_clients_get_only_correct_answers(rank_service, scrape, tmp_path, capsys) -> None:
    reference, version = _reference(rank_service)

    def check(k: int, resp) -> str | None:
        if resp.model_version != version:
            return f"model version {resp.model_version!r}, expected {version!r}"
        got = {i.item_id: i.score for i in resp.items}
        want = reference[k]
        if not np.allclose([got[i] for i in want], list(want.values()), atol=ATOL, rtol=0):
            worst = max(abs(got[i] - want[i]) for i in want)
            return f"scores differ from ONNX Runtime's by up to {worst:.2e}"
        return None

    before = scrape(rank_service.metrics_url)
    result = asyncio.run(
        rank_load(rank_service.address, rank_service.data.requests, LOAD_CLIENTS, LOAD_SECONDS, check=check)
    )
    after = scrape(rank_service.metrics_url)

    report = result.summary() | {"loadavg_1_5_15": os.getloadavg(), "cpus": os.cpu_count()}
    (tmp_path / "rank_load.json").write_text(json.dumps(report, indent=2))
    with capsys.disabled():
        print(
            f"\nRank load: {LOAD_CLIENTS} clients x {result.seconds:.0f}s: {report['answered']} answers, "
            f"p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms, {report['qps']:.1f}/s, "
            f"errors {report['errors']}, load average {report['loadavg_1_5_15']} ({tmp_path / 'rank_load.json'})"
        )

    assert not result.errors, (dict(result.errors), result.error_details)
    assert result.n_malformed == 0, result.malformed
    assert min(result.answered_per_client) > 0  # every client got answers, not just some
    assert _counter(after, "OK") - _counter(before, "OK") == len(result.latencies_ms)
