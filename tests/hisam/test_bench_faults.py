"""``hisam bench faults --quick`` against real services: a broker, a stream worker process on Redis
and on SQLite, and a Rank server. Every hostile kind is tried and refused as its kind should be;
no valid action is lost, doubled or reordered; the worker never exits; no partition stalls.

The bench runs once for the module (about a minute with the tokenizer and the ONNX export
cached; their first build adds one to two minutes on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest

from hisam.bench import faults
from hisam.bench.faults.inputs import STREAM_KINDS
from hisam.bench.faults.rank import RANK_KINDS

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

BACKENDS = ("redis", "sqlite")
# Kinds whose every record must be dead-lettered (the others are appended or ignored, or mixed).
DEAD_LETTERED = set(STREAM_KINDS) - {"duplicate_event_id", "action_before_item"}


@pytest.fixture(scope="module")
def result(build_cache) -> dict:
    parser = argparse.ArgumentParser()
    faults.add_arguments(parser)
    args = parser.parse_args(["--quick", "--work-dir", str(build_cache("hisam-bench-faults"))])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert faults.main(args) == 0
    text = out.getvalue()
    print(text[:-1].rsplit("\n", 1)[0])  # the table, shown on failure
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_valid_is_lost_doubled_or_reordered_and_the_worker_never_exits(result, backend) -> None:
    r = result[backend]
    assert r["worker_exits"] == 0, r["details"]
    assert r["stalled_partitions"] == 0, r["details"]["stalled"]
    assert (r["lost_actions"], r["doubled_actions"], r["misordered_users"]) == (0, 0, 0), r["details"]
    assert r["valid_actions"] >= 300 and r["unmatched_dead_letters"] == 0
    assert r["stream_unexpected_outcomes"] == 0, r["details"]["unexpected"]
    assert r["details"]["send_refused"] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_hostile_kind_is_tried_and_refused_as_its_kind_should_be(result, backend) -> None:
    r = result[backend]
    assert set(r["inputs_by_kind"]) == set(STREAM_KINDS) | set(RANK_KINDS)
    assert all(n > 0 for n in r["inputs_by_kind"].values()), r["inputs_by_kind"]
    assert r["inputs_tried"] >= 140
    for kind in DEAD_LETTERED:
        assert sum(r["dead_letters_by_kind"].get(kind, {}).values()) > 0, kind
    assert r["dead_letters_by_kind"]["corrupt_user_state"] == {"corrupt_user_state": r["corrupt_user_actions"]}
    n_nan = r["inputs_by_kind"]["non_finite_embedding"]
    assert r["dead_letters_by_kind"]["non_finite_embedding"] == {"non_finite_embedding": n_nan}
    codes = r["rank_codes_by_kind"]
    for kind, want in RANK_KINDS.items():
        if kind != "rank_garbage_bytes":  # see the test below
            assert set(codes[kind]) == set(want), (kind, codes[kind])
    assert r["rank_refused"] > 0
    assert r["rank_valid_ok"] == r["rank_valid_calls"] > 0 and r["rank_malformed_answers"] == 0
    # A corrupted user's Rank is INTERNAL by design (naming the user); counted apart.
    assert r["rank_corrupt_user_codes"] == {"INTERNAL": r["rank_corrupt_user"]} and r["rank_corrupt_user"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_rank_bytes_are_refused_and_nothing_is_internal(result, backend) -> None:
    r = result[backend]
    assert r["rank_codes_by_kind"]["rank_garbage_bytes"].keys() == {"INVALID_ARGUMENT"}
    assert r["rank_internal_errors"] == 0
    assert r["rank_unexpected_outcomes"] == 0
