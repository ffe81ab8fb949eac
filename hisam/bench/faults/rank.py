"""The Rank side of the fault bench: a real gRPC Rank server (serving.server, in process, on the
tiny model in ONNX Runtime) reading the worker's store, malformed requests sent raw through a
generic ``unary_unary`` with identity serializers, and valid calls interleaved with them, each
answer checked against the Rank contract (``serving.load.check_answer``)."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from hisam_pb.v1 import rank_pb2

RANK_METHOD = "/hisam.pb.v1.RankingService/Rank"
MAX_CANDIDATES = 1000
I64_MAX = 2**63 - 1
REFUSED = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"})
FAILED = frozenset({"INTERNAL", "UNKNOWN"})

# kind -> the status codes the Rank contract (rank.proto) gives it
RANK_KINDS: dict[str, frozenset[str]] = {
    "rank_garbage_bytes": frozenset({"INVALID_ARGUMENT"}),
    "rank_oversize": frozenset({"RESOURCE_EXHAUSTED"}),
    "rank_long_request_id": frozenset({"INVALID_ARGUMENT"}),
    "rank_negative_ids": frozenset({"INVALID_ARGUMENT"}),
    "rank_duplicate_ids": frozenset({"INVALID_ARGUMENT"}),
    "rank_too_many_candidates": frozenset({"INVALID_ARGUMENT"}),
    "rank_no_candidates": frozenset({"INVALID_ARGUMENT"}),
    "rank_huge_ids": frozenset({"OK"}),  # a valid request: unknown items come back unscored
}
# The fewest calls of a kind: one of each variant its generator cycles through.
RANK_MIN = {k: 2 for k in RANK_KINDS} | {"rank_garbage_bytes": 4}


@dataclass
class Call:
    kind: str  # a RANK_KINDS key, "valid" or "corrupt_user"
    payload: bytes
    request: tuple[int, list[int]] | None = None  # for valid calls: (user, items), checked on answer
    request_id: str = ""
    note: str = ""


@dataclass
class RankTally:
    """What the Rank calls got back."""

    by_kind: dict[str, Counter] = field(default_factory=dict)  # kind -> status code name -> calls
    unexpected: list[str] = field(default_factory=list)  # the first few, with the answer
    malformed_answers: list[str] = field(default_factory=list)

    def add(self, kind: str, code: str) -> None:
        self.by_kind.setdefault(kind, Counter())[code] += 1

    def count(self, kinds, codes) -> int:
        return sum(n for k, c in self.by_kind.items() if k in kinds for code, n in c.items() if code in codes)


def _garbage(rng: np.random.Generator, k: int) -> tuple[bytes, str]:
    if k % 4 == 3:  # a well-formed request whose request_id is not UTF-8
        body = rank_pb2.RankRequest(user_id=1, item_ids=[1, 2]).SerializeToString()
        rid = b"\xff\xfe\xfd" + rng.bytes(5)
        return body + b"\x1a" + bytes([len(rid)]) + rid, "request_id not UTF-8"
    while True:
        b = rng.bytes(int(rng.integers(1, 300)))
        try:
            rank_pb2.RankRequest.FromString(b)
        except DecodeError:
            return b, f"{len(b)} random bytes"


def hostile_calls(rng: np.random.Generator, counts: dict[str, int], users: list[int], items: list[int]) -> list[Call]:
    def req(user: int, ids, rid: str = "") -> bytes:
        return rank_pb2.RankRequest(user_id=user, item_ids=list(ids), request_id=rid).SerializeToString()

    def some(n: int) -> list[int]:
        return rng.choice(items, size=min(n, len(items)), replace=False).tolist()

    out = []
    for kind in RANK_KINDS:
        for k in range(counts.get(kind, 0)):
            u = int(users[rng.integers(len(users))])
            if kind == "rank_garbage_bytes":
                payload, note = _garbage(rng, k)
            elif kind == "rank_oversize":
                n = (1 << 20) // 9 + int(rng.integers(1, 50_000))  # 9-byte varints: > 1 MiB
                payload, note = req(u, range(I64_MAX - n, I64_MAX)), f"{n} candidates"
            elif kind == "rank_long_request_id":
                payload, note = req(u, some(5), "r" * 200), "200-byte request_id"
            elif kind == "rank_negative_ids":
                payload, note = (req(-1 - k, some(5)), "negative user") if k % 2 else (req(u, [-5, 1]), "negative item")
            elif kind == "rank_duplicate_ids":
                ids = some(5)
                payload, note = req(u, ids + ids[:2]), "duplicate items"
            elif kind == "rank_too_many_candidates":
                n = MAX_CANDIDATES + 1 + int(rng.integers(0, 4000))
                payload, note = req(u, range(n)), f"{n} candidates"
            elif kind == "rank_no_candidates":
                payload, note = req(u, []), "no candidates"
            else:
                payload, note = req(I64_MAX - k, range(I64_MAX - 20, I64_MAX)), "ids near 2^63-1"
            out.append(Call(kind, payload, note=note))
    return out


def valid_calls(rng: np.random.Generator, n: int, users: list[int], items: list[int]) -> list[Call]:
    out = []
    for k in range(n):
        u = int(users[rng.integers(len(users))])
        ids = rng.choice(items, size=int(rng.integers(5, min(41, len(items)))), replace=False).tolist()
        rid = f"valid-{k}"
        payload = rank_pb2.RankRequest(user_id=u, item_ids=ids, request_id=rid).SerializeToString()
        out.append(Call("valid", payload, (u, ids), rid))
    return out


def interleave(rng: np.random.Generator, hostile: list[Call], valid: list[Call]) -> list[Call]:
    calls = hostile + valid
    return [calls[i] for i in rng.permutation(len(calls))]


class RankClient:
    """Raw calls on the Rank method: bytes in, bytes out (identity serializers)."""

    def __init__(self, address: str):
        from serving.security import rank_channel

        self.channel = rank_channel(address, options=[("grpc.max_send_message_length", 16 << 20)])
        self.raw = self.channel.unary_unary(RANK_METHOD, request_serializer=None, response_deserializer=None)

    def call(self, c: Call, tally: RankTally, timeout_s: float = 30.0) -> str:
        from serving.load import check_answer

        try:
            answer = self.raw(c.payload, timeout=timeout_s)
            code = "OK"
        except grpc.RpcError as e:
            answer, code = None, e.code().name
            detail = e.details() or ""
        tally.add(c.kind, code)
        want = RANK_KINDS.get(c.kind) or frozenset({"INTERNAL"} if c.kind == "corrupt_user" else {"OK"})
        if code not in want and len(tally.unexpected) < 20:
            tally.unexpected.append(f"{c.kind} ({c.note or c.request}): {code} {'' if answer else detail[:200]}")
        if answer is not None and c.request is not None:
            problem = check_answer(c.request, c.request_id, rank_pb2.RankResponse.FromString(answer))
            if problem and len(tally.malformed_answers) < 20:
                tally.malformed_answers.append(f"{c.request}: {problem}")
        return code

    def close(self) -> None:
        self.channel.close()


class CallsInBackground:
    """Runs a list of calls in a thread while the stream traffic is produced."""

    def __init__(self, client: RankClient, calls: list[Call], tally: RankTally):
        self.client, self.calls, self.tally = client, calls, tally
        self.thread = threading.Thread(target=self._run, name="rank-calls", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            for c in self.calls:
                self.client.call(c, self.tally)
        except Exception as e:  # noqa: BLE001 - raised again by __exit__, in the caller's thread
            self.error = e

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def rank_server(repo: Path, store_cfg) -> Iterator[str]:
    """A Rank server on ``repo``'s model (ONNX Runtime in process) over ``store_cfg``'s store; yields its address."""
    from features.store import open_stream_store
    from serving.backends import OrtBackend
    from serving.online import OnlineReader, store_config_for_reads
    from serving.profiles import Profiles
    from serving.ranking import Ranker, model_info
    from serving.server import rank_server_thread

    def make_ranker() -> Ranker:
        reader = OnlineReader(open_stream_store(store_config_for_reads(store_cfg)))
        return Ranker(OrtBackend(repo), reader, Profiles.empty(), model_info(repo), max_candidates=MAX_CANDIDATES)

    with rank_server_thread(make_ranker, grace_s=1.0) as handle:
        yield handle.address
