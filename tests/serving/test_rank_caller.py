"""``serving.load.RankCaller`` / ``RankProbe`` / ``rank_calls``: every call kept as a row, answers and errors.

Against a stand-in RankingService in this process that fails every third call, so that
both kinds of row are seen in well under a second (the real server is exercised by
test_rank_load.py and the trainer's reliability tests).
"""

from __future__ import annotations

import itertools
import time
from concurrent import futures

import grpc
import pytest

from serving.load import RankCaller, RankProbe, rank_calls


@pytest.fixture
def address():
    from hisam_pb.v1 import rank_pb2, rank_pb2_grpc

    class FlakyRank(rank_pb2_grpc.RankingServiceServicer):
        calls = itertools.count(1)

        def Rank(self, request, context):
            if next(self.calls) % 3 == 0:
                context.abort(grpc.StatusCode.UNAVAILABLE, "triton is down")
            items = [
                rank_pb2.ScoredItem(item_id=i, score=1.0 / (k + 1), status=rank_pb2.ITEM_STATUS_SCORED)
                for k, i in enumerate(request.item_ids)
            ]
            return rank_pb2.RankResponse(items=items, model_version="v1", request_id=request.request_id, history_len=3)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    rank_pb2_grpc.add_RankingServiceServicer_to_server(FlakyRank(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_probe_keeps_every_answer_and_every_failure(address) -> None:
    probe = RankProbe(address, 1, [5, 6], interval_s=0.01).start()
    deadline = time.monotonic() + 30
    while len(probe.calls) < 9 and time.monotonic() < deadline:
        time.sleep(0.01)
    probe.close()
    probe.close()  # a second close does nothing
    n = len(probe.calls)
    assert n >= 9 and len(probe.versions) + len(probe.failures) == n
    assert set(probe.versions) == {"v1"} and set(probe.failures) == {"UNAVAILABLE: triton is down"}
    assert len(probe.failures) == n // 3
    time.sleep(0.05)
    assert len(probe.calls) == n  # closed: no more calls


def test_a_caller_asks_only_when_it_has_a_request(address) -> None:
    requests = iter([None, None, (2, [7, 8, 9])])
    caller = RankCaller(address, lambda: next(requests, None), interval_s=0.01).start()
    deadline = time.monotonic() + 30
    while not caller.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    caller.close()
    (row,) = caller.calls
    assert row["ok"] and row["user"] == 2 and row["model_version"] == "v1" and row["scored"] == 3
    assert row["top"] == [(7, 1.0), (8, 0.5), (9, 0.3333)] and row["history_len"] == 3 and row["ms"] > 0


def test_rank_calls_answers_each_request_in_order(address) -> None:
    rows = rank_calls(address, [(1, [4]), (2, [5]), (3, [6])])
    assert [r["user"] for r in rows] == [1, 2, 3] and [r["ok"] for r in rows] == [True, True, False]
    assert rows[2]["error"] == "UNAVAILABLE: triton is down"


def test_a_caller_closed_before_it_started_just_closes(address) -> None:
    RankCaller(address, lambda: None, interval_s=0.01).close()
