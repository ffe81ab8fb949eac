"""Serving fixtures: a tiny scrambled HMAT, its three ONNX graphs, a model repository, and a
served model (store, Triton, ``hisam serve`` as a process) for the reliability, load and
metrics tests.

Exporting the three graphs takes 30-100 s on a busy 2-core machine (dynamo tracing), so the
exported files are kept in pytest's cache directory (``.pytest_cache``), keyed by a hash of
the model's and the exporter's source files, the config, the seed and the torch version:
any change to them exports again. The weights are stored with the graphs, so the PyTorch
reference always runs the exact weights the graphs were exported from. The export itself
is tested in tests/export/test_hmat_export.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import graphs as ex
from models.hmat.model import HMAT, HMATConfig, hmat_cpu
from models.hmat.testing import scrambled

SEED = 20260522
N_CODES = 6  # the tiny tokenizer's codes per item (3 shared + 1 per modality)
CODEBOOK = 16  # the tiny tokenizer's codebook size


def tiny_config() -> HMATConfig:
    return dataclasses.replace(
        hmat_cpu(), n_sid=N_CODES, codebook_size=CODEBOOK, profile_vocab_size=8, max_items=20, max_profile_len=4
    )


def scrambled_model(config: HMATConfig, seed: int) -> HMAT:
    """Weights at a scale where attention patterns matter (the 0.02 init makes scores nearly flat)."""
    torch.manual_seed(seed)
    return scrambled(HMAT(config))


@dataclasses.dataclass
class TinyExport:
    model: HMAT
    graphs: dict[str, onnx.ModelProto]


@pytest.fixture(scope="session")
def tiny_export(build_cache) -> TinyExport:
    config = tiny_config()
    cache = build_cache("hisam-serving-onnx") / ex.graph_key(config, str(SEED))
    if not all((cache / f"{g}.onnx").is_file() for g in ex.GRAPHS) or not (cache / "weights.pt").is_file():
        model = scrambled_model(config, SEED)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), tmp / "weights.pt")
        ex.export_all(model, tmp, tokenizer_version=None)
        tmp.rename(cache)
    model = HMAT(config)
    model.load_state_dict(torch.load(cache / "weights.pt", weights_only=True))
    return TinyExport(model.eval(), {g: onnx.load(str(cache / f"{g}.onnx")) for g in ex.GRAPHS})


def restamped(graphs: dict[str, onnx.ModelProto], **props: str) -> dict[str, onnx.ModelProto]:
    """Copies of the graphs with metadata entries replaced (a new model_version / tokenizer_version)."""
    out = {}
    for g, proto in graphs.items():
        p = onnx.ModelProto()
        p.CopyFrom(proto)
        meta = {m.key: m.value for m in p.metadata_props} | props
        onnx.helper.set_model_props(p, meta)
        out[g] = p
    return out


@pytest.fixture(scope="session")
def restamp():
    """``restamped`` for tests (conftest modules are not importable)."""
    return restamped


# --- a served tiny model: online store, repository, Triton, `hisam serve` as a process -----------
# For the reliability, load and metrics tests (test_reliability_triton.py, test_rank_load.py,
# test_metrics.py). Everything is real: tritonserver on the repository, the Rank server as its
# own process (python -m hisam.jobs.serve), reading a store filled through the store's own API.

STREAM_LEN = 20  # = the tiny model's max_items
N_USERS = 24
N_ITEMS = 200


@dataclasses.dataclass(frozen=True)
class StoreData:
    """A filled online store: its config, ``hisam serve`` options for it, and Rank requests on it."""

    cfg: object  # features.store.OnlineStoreConfig
    args: list[str]
    users: list[int]
    items: list[int]
    requests: list[tuple[int, list[int]]]  # (user, distinct candidates); some users are cold


def fill_store(cfg, seed: int = 0, n_requests: int = 64) -> StoreData:
    """Items 0..N_ITEMS-1 with random codes; users 0..N_USERS-1 with 3..30 actions (the store keeps T)."""
    from features.store import ItemSids, StreamAction, open_stream_store

    rng = np.random.default_rng(seed)
    tokens = rng.integers(CODEBOOK, size=(N_ITEMS, N_CODES)) + np.arange(N_CODES) * CODEBOOK
    store = open_stream_store(cfg)
    store.put_item_sids([ItemSids(i, tuple(map(int, tokens[i])), "", 0) for i in range(N_ITEMS)])
    actions = [
        StreamAction(u, f"s{seed}-{u}-{t}", int(i), int(rng.integers(1, 7)), 1 + t, tuple(map(int, tokens[i])))
        for u in range(N_USERS)
        for t, i in enumerate(rng.integers(N_ITEMS, size=int(rng.integers(3, 31))))
    ]
    store.append_batch(actions, want_history=False)
    store.close()
    requests = [
        (
            int(rng.integers(N_USERS + 4)),
            sorted(rng.choice(N_ITEMS, size=int(rng.integers(5, 41)), replace=False).tolist()),
        )
        for _ in range(n_requests)
    ]  # users N_USERS.. have no stream (cold: profile only)
    args = ["--backend", cfg.backend, "--repo-dir", str(cfg.repo_dir), "--stream-len", str(STREAM_LEN)]
    args += ["--n-codes", str(N_CODES)] + (["--redis-url", cfg.redis_url] if cfg.redis_url else [])
    return StoreData(cfg, args, list(range(N_USERS)), list(range(N_ITEMS)), requests)


@pytest.fixture(scope="session")
def model_repo(tiny_export, tmp_path_factory) -> Path:
    """A model repository holding the tiny model as version 1 (read-only for the tests that share it)."""
    from serving.repository import publish_version

    repo = tmp_path_factory.mktemp("served") / "model_repo"
    publish_version(repo, tiny_export.graphs)
    return repo


@pytest.fixture(scope="session")
def sqlite_store(tmp_path_factory) -> StoreData:
    from features.store import OnlineStoreConfig

    work = tmp_path_factory.mktemp("sqlite_store")
    cfg = OnlineStoreConfig(backend="sqlite", repo_dir=work, stream_len=STREAM_LEN, n_codes=N_CODES)
    return fill_store(cfg, seed=1)


class RestartableTriton:
    """A Triton on ``repo`` that a test stops and starts again on the same ports (outage tests)."""

    def __init__(self, repo: Path, log_dir: Path | None = None) -> None:
        from infra.triton import triton_server

        self.repo, self.log_dir, self._triton_server = repo, log_dir, triton_server
        self.stack = contextlib.ExitStack()
        self.server = self.stack.enter_context(triton_server(repo, poll_s=1.0, log_dir=log_dir))

    def stop(self) -> None:
        self.stack.close()

    def start(self) -> None:
        s = self.server
        self.stack = contextlib.ExitStack()
        self.server = self.stack.enter_context(
            self._triton_server(
                self.repo,
                grpc_port=s.grpc_port,
                http_port=s.http_port,
                metrics_port=s.metrics_port,
                log_dir=self.log_dir,
            )
        )


@pytest.fixture(scope="session")
def restartable_triton():
    """The ``RestartableTriton`` class (conftest modules are not importable)."""
    return RestartableTriton


@dataclasses.dataclass(frozen=True)
class RankService:
    address: str
    metrics_url: str
    pid: int
    triton_url: str
    repo: Path
    data: StoreData
    log_path: Path


@pytest.fixture(scope="session")
def rank_service(model_repo, tmp_path_factory) -> RankService:
    """Triton + a private Redis store + ``hisam serve`` (JSON logs, /metrics on), shared by the load and metrics tests."""
    from features.store import OnlineStoreConfig
    from infra.ports import free_port
    from infra.services import redis_server
    from infra.triton import triton_server
    from serving.load import serve_process

    work = tmp_path_factory.mktemp("rank_service")
    with redis_server() as redis, triton_server(model_repo, log_dir=work / "triton") as triton:
        cfg = OnlineStoreConfig(
            backend="redis", redis_url=redis.url, repo_dir=work / "store", stream_len=STREAM_LEN, n_codes=N_CODES
        )
        data = fill_store(cfg, seed=2)
        port = free_port()
        args = ["--model-repo", str(model_repo), "--triton-url", triton.url, "--metrics-port", str(port)]
        args += ["--log-format", "json", "--health-interval", "0.2", *data.args]
        with serve_process(args, work / "serve.log") as served:
            yield RankService(
                served.address, f"http://127.0.0.1:{port}/metrics", served.proc.pid, triton.url, model_repo, data,
                served.log_path,
            )  # fmt: skip


def scrape_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A /metrics page as {(sample name, sorted labels): value}."""
    import urllib.request

    from infra.observability import parse_metrics

    with urllib.request.urlopen(url, timeout=10) as r:
        return parse_metrics(r.read().decode())


@pytest.fixture(scope="session")
def scrape():
    """``scrape(url)``: a /metrics page as {(sample name, sorted labels): value}."""
    return scrape_metrics
