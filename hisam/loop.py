"""The whole loop on one machine (``hisam run``): events in, features fresh, model learning, Rank serving.

Stages, each reused when its output is already there and still valid:

1. dataset: ML-100K (or a directory in the custom format) with its item modalities;
2. tokenizer: the frozen DST (``artifacts/tokenizers/dst``);
3. initial ranker: HMAT, PT then SFT on the training period (the chronological 90%), CPU
   preset, short history (``--max-items``), so it takes minutes on a laptop;
4. services: the Kafka-compatible broker, Redis when ``--backend redis``, Triton on a fresh
   model repository holding the initial ranker as version 1, then the stream worker, the
   Rank server and the near-line trainer as supervised processes (infra/supervisor.py);
5. backfill: every item and the training period's actions go through the stream, so every
   user has a history in the online store; the trainer's consumer group is then placed at
   the end of training-samples (those samples trained the initial ranker already);
6. replay: the test period's actions at ``--rate`` per second, as live traffic. Meanwhile a
   freshness probe times produce -> visible in the online store for one action in
   ``--probe-every``, a Rank client calls Rank about twice a second for users just seen,
   and a progress line every few seconds shows ingest, freshness, trainer and Rank;
7. drain and report: wait (bounded) for the stream and trainer to catch up, send sample
   Rank calls, write ``reports/run/report.md`` with a table and plots, and
   ``summary.json``; then stop everything in reverse order. Ctrl-C at any point stops the
   children cleanly and still writes what was measured.

The work directory (``runs/loop/<time>``) holds the run's online store, model repository,
trainer state and each process's log; trained artifacts live under ``--artifacts``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data import default_data_dir
from infra.kafka import Offsets, commit_at_end

log = logging.getLogger(__name__)

STREAM_GROUP = "hisam-stream"  # the stream worker's app id = its consumer group
TRAINER_GROUP = "hisam-trainer"


@dataclass
class LoopOptions:
    """What ``hisam run`` takes (hisam/jobs/run_all.py maps the command line onto it)."""

    dataset: str = "ml-100k"
    data_dir: Path = field(default_factory=default_data_dir)
    artifacts: Path = Path("artifacts")
    reports: Path = Path("reports")
    work_dir: Path | None = None  # default: runs/loop/<time>
    backend: str = "sqlite"
    max_items: int = 50  # T for the initial ranker and the online stream
    pt_epochs: int = 1
    sft_epochs: int = 1
    threads: int = 1  # torch threads for the ranker and trainer (2-core machines: 1)
    rate: float = 50.0  # replayed actions per second
    replay_limit: int = 0  # 0: the whole test period
    probe_every: int = 20
    rank_interval_s: float = 0.5
    candidates: int = 50
    progress_every_s: float = 5.0
    drain_timeout_s: float = 120.0
    min_samples: int = 500  # trainer: samples between gates
    trainer_lr: float = 1e-4
    seed: int = 0
    progress: bool = True


# --- Kafka helpers (kafka-python) --------------------------------------------------------------


# --- measurements during the replay -----------------------------------------------------------


def percentile(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else math.nan


class FreshnessProbe:
    """Produce -> visible in the online store, for one replayed action in ``every``.

    Reads the user's stream directly (Feast's own bytes, as Rank reads them) until the
    action's event id is there. Runs in its own thread; ``submit`` is called by the replay.
    """

    def __init__(self, store, every: int, timeout_s: float = 10.0) -> None:
        self.store, self.every, self.timeout_s = store, every, timeout_s
        self.pending: deque[tuple[int, str, float]] = deque()
        self.latencies_ms: list[float] = []
        self.timeouts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freshness-probe", daemon=True)

    def start(self) -> FreshnessProbe:
        self._thread.start()
        return self

    def submit(self, user_id: int, event_id: str, produced_at: float) -> None:
        self.pending.append((user_id, event_id, produced_at))

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.pending:
                time.sleep(0.002)
                continue
            user, event_id, t0 = self.pending[0]
            stream = self.store.read_streams([user])[0]
            now = time.perf_counter()
            if stream is not None and event_id in stream.event_ids[-64:]:
                self.latencies_ms.append((now - t0) * 1000)
                self.pending.popleft()
            elif now - t0 > self.timeout_s:
                self.timeouts += 1
                self.pending.popleft()
            else:
                time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class RankSampler:
    """Calls Rank for users just seen in the replay, like a front end would; records every call."""

    def __init__(self, address: str, items: np.ndarray, candidates: int, interval_s: float, seed: int = 0) -> None:
        self.address, self.items, self.k, self.interval_s = address, items, candidates, interval_s
        self.rng = random.Random(seed)
        self.recent: deque[int] = deque(maxlen=256)
        self.calls: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rank-sampler", daemon=True)

    def start(self) -> RankSampler:
        self._thread.start()
        return self

    def call(self, stub, user: int, items: list[int], timeout_s: float = 10.0) -> dict:
        import grpc

        from hisam_pb.v1 import rank_pb2

        t0 = time.perf_counter()
        row: dict = {"t": time.time(), "user": user}
        try:
            resp = stub.Rank(rank_pb2.RankRequest(user_id=user, item_ids=items), timeout=timeout_s)
            row |= {
                "ok": True,
                "ms": (time.perf_counter() - t0) * 1000,
                "model_version": resp.model_version,
                "history_len": resp.history_len,
                "cache_hit": resp.cache_hit,
                "top": [(it.item_id, round(it.score, 4)) for it in resp.items[:5]],
                "scored": sum(it.status == rank_pb2.ITEM_STATUS_SCORED for it in resp.items),
            }
        except grpc.RpcError as e:
            row |= {"ok": False, "ms": (time.perf_counter() - t0) * 1000, "error": f"{e.code().name}: {e.details()}"}
        return row

    def _run(self) -> None:
        import grpc

        from hisam_pb.v1 import rank_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = rank_pb2_grpc.RankingServiceStub(channel)
            while not self._stop.wait(self.interval_s):
                if not self.recent:
                    continue
                user = self.rng.choice(self.recent)
                items = self.rng.sample(range(len(self.items)), min(self.k, len(self.items)))
                self.calls.append(self.call(stub, user, [int(self.items[i]) for i in items]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


# --- stages -----------------------------------------------------------------------------------


def ensure_tokenizer(opts: LoopOptions, ds) -> Path:
    """The frozen DST tokenizer: reused when its artifact loads, trained otherwise (~1-5 min)."""
    from models.tokenizer import FrozenTokenizer
    from recipes.tokenizer.train import TrainConfig

    path = opts.artifacts / "tokenizers" / "dst"
    with contextlib.suppress(FileNotFoundError, ValueError, OSError, KeyError):
        tok = FrozenTokenizer.load(path)
        log.info("tokenizer: reusing %s (%s)", path, tok.version)
        return path
    import torch

    from recipes.tokenizer.variants import DEFAULT_LR, VARIANTS, train_variant

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(lr=DEFAULT_LR[VARIANTS["dst"][0]], seed=opts.seed, device=device, progress=opts.progress)
    tok = train_variant("dst", ds, path.parent, cfg, {})
    log.info("tokenizer: trained %s -> %s", tok.version, path)
    return path


def ensure_ranker(opts: LoopOptions, tokenizer: Path) -> Path:
    """The initial ranker (PT -> SFT on the training period); reused when it matches the tokenizer."""
    from hisam.cli import main as cli
    from models.hmat.checkpoint import read_checkpoint_config
    from models.tokenizer import FrozenTokenizer

    out = opts.artifacts / "ranker"
    final = out / "hmat" / f"seed{opts.seed}" / "finetune"
    version = FrozenTokenizer.load(tokenizer).version
    with contextlib.suppress(FileNotFoundError, OSError, KeyError, ValueError):
        cfg = read_checkpoint_config(final)
        if cfg["tokenizer_version"] == version and cfg["model"]["max_items"] == opts.max_items:
            log.info("ranker: reusing %s", final)
            return final
    common = [
        "--dataset", opts.dataset, "--data-dir", str(opts.data_dir), "--tokenizer", str(tokenizer),
        "--out", str(out), "--max-items", str(opts.max_items), "--seeds", str(opts.seed),
        "--threads", str(opts.threads), "--warmup-steps", "20",
    ]  # fmt: skip
    if not opts.progress:
        common.append("--no-progress")
    for argv in (
        ["ranker", "pretrain", *common, "--epochs", str(opts.pt_epochs)],
        ["ranker", "finetune", *common, "--epochs", str(opts.sft_epochs), "--init", "pretrain"],
    ):
        log.info("ranker: hisam %s", " ".join(argv[:2]))
        if cli(argv) != 0:
            raise RuntimeError(f"`hisam {' '.join(argv)}` failed")
    return final


def wait_drained(
    offsets: Offsets, group: str, topic: str, timeout_s: float, on_tick: Callable[[int, int], None] | None = None
) -> int:
    """Wait until ``group`` has committed everything on ``topic``; returns the lag left."""
    deadline = time.monotonic() + timeout_s
    lag = -1
    while time.monotonic() < deadline:
        consumed, lag = offsets.position(group, topic)
        if on_tick:
            on_tick(consumed, lag)
        if lag == 0:
            return 0
        time.sleep(0.5)
    return lag


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything measured during one loop, filled in as it goes (a Ctrl-C keeps what is there)."""

    opts: LoopOptions
    work: Path
    stages: dict[str, float] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)  # progress rows (the report's plots)
    probe: FreshnessProbe | None = None
    sampler: RankSampler | None = None
    interrupted: bool = False
    error: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str, number: int, total: int = 7):
        log.info("[%d/%d] %s", number, total, name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - t0, 1)


def _trainer_snapshot(state_dir: Path, repo: Path) -> dict:
    from hisam.jobs.trainer_status import status

    try:
        return status(state_dir, repo, n_lineage=1000)
    except (OSError, ValueError, KeyError) as e:  # a snapshot being replaced under us: next tick
        log.debug("trainer status unavailable: %s", e)
        return {}


def _progress_row(run: Run, offsets: Offsets, t_start: float, produced: int, total: int, state_dir, repo) -> dict:
    from stream import topics as tp

    appended, lag = offsets.position(STREAM_GROUP, tp.USER_ACTIONS)
    dead = sum(offsets.end(tp.DEAD_LETTERS).values())
    fresh = run.probe.latencies_ms[-200:] if run.probe else []
    calls = run.sampler.calls[-50:] if run.sampler else []
    ok = [c["ms"] for c in calls if c["ok"]]
    snap = _trainer_snapshot(state_dir, repo)
    metrics = snap.get("window_metrics", {})
    lineage = snap.get("lineage", [])
    return {
        "t": round(time.perf_counter() - t_start, 2),
        "produced": produced,
        "total": total,
        "appended": appended,
        "stream_lag": lag,
        "dead_letters": dead,
        "fresh_p50_ms": percentile(fresh, 50),
        "fresh_p99_ms": percentile(fresh, 99),
        "rank_calls": len(run.sampler.calls) if run.sampler else 0,
        "rank_errors": sum(not c["ok"] for c in run.sampler.calls) if run.sampler else 0,
        "rank_p50_ms": percentile(ok, 50),
        "rank_p99_ms": percentile(ok, 99),
        "rank_version": next((c["model_version"] for c in reversed(calls) if c["ok"]), ""),
        "trained": snap.get("trained", 0),
        "serving_version": snap.get("serving_version"),
        "published": sum(r.get("event") == "published" for r in lineage),
        "auc": {m: v.get("auc") for m, v in metrics.items()},
        "gauc": {m: v.get("gauc") for m, v in metrics.items()},
    }


def _fmt_ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.0f}"


def progress_line(row: dict, prev: dict | None) -> str:
    dt = row["t"] - (prev["t"] if prev else 0.0)
    rate = (row["appended"] - (prev["appended"] if prev else 0)) / dt if dt > 0 else 0.0
    auc = row["auc"]
    models = " / ".join(f"{m} {v:.3f}" for m, v in sorted(auc.items()) if v is not None and not math.isnan(v))
    return (
        f"replay {row['produced']:,}/{row['total']:,} | stream {row['appended']:,} appended ({rate:,.0f}/s), "
        f"lag {row['stream_lag']:,}, dead {row['dead_letters']}, fresh p50/p99 {_fmt_ms(row['fresh_p50_ms'])}/"
        f"{_fmt_ms(row['fresh_p99_ms'])} ms | trainer {row['trained']:,} samples, AUC {models or '-'}, "
        f"{row['published']} published, serving v{row['serving_version'] or '-'} | Rank {row['rank_calls']} calls, "
        f"p50/p99 {_fmt_ms(row['rank_p50_ms'])}/{_fmt_ms(row['rank_p99_ms'])} ms, {row['rank_errors']} errors, "
        f"answered by {row['rank_version'] or '-'}"
    )


def run_loop(opts: LoopOptions) -> Run:
    """Run every stage; returns the Run (also on Ctrl-C, with ``interrupted`` set)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(opts.work_dir or Path("runs/loop") / stamp)
    work.mkdir(parents=True, exist_ok=True)
    run = Run(opts, work)
    try:
        _run_stages(run)
    except KeyboardInterrupt:
        run.interrupted = True
        log.warning("interrupted: everything was stopped; the report holds what was measured")
    except Exception as e:  # reported (with the child's log when a child died), then the exit status says so
        run.error = f"{type(e).__name__}: {e}"
        log.exception("the loop failed; everything was stopped")
    return run


def _run_stages(run: Run) -> None:
    import torch

    from data import load_dataset
    from features.store import OnlineStoreConfig, open_stream_store
    from infra.ports import free_port
    from infra.services import kafka_broker, redis_server
    from infra.supervisor import Supervisor
    from infra.triton import triton_server
    from serving.repository import publish_version
    from stream import producer as prod
    from stream import topics as tp

    opts, work = run.opts, run.work
    torch.set_num_threads(max(1, opts.threads))
    for noisy in ("kafka", "onnx_ir", "onnxscript", "torch.onnx"):  # per-connection / per-pass INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with run.stage("dataset", 1):
        ds = load_dataset(opts.dataset, str(opts.data_dir), progress=opts.progress)
        run.facts["dataset"] = ds.summary()
    with run.stage("tokenizer", 2):
        tokenizer = ensure_tokenizer(opts, ds)
    with run.stage("initial ranker", 3):
        checkpoint = ensure_ranker(opts, tokenizer)
    run.facts["tokenizer"], run.facts["checkpoint"] = str(tokenizer), str(checkpoint)

    repo, state_dir, feature_repo = work / "model_repo", work / "trainer", work / "feature_repo"
    with contextlib.ExitStack() as stack:
        with run.stage("services", 4):
            broker = stack.enter_context(kafka_broker(data_dir=work / "kafka"))
            redis_url = None
            if opts.backend == "redis":
                redis_url = stack.enter_context(redis_server()).url
            tp.ensure_topics(broker.bootstrap, tp.default_topics(4))
            publish_version(repo, checkpoint)
            triton = stack.enter_context(triton_server(repo, poll_s=1.0, log_dir=work / "logs"))
            sup = stack.enter_context(Supervisor(work / "logs", env={"PYTHONUNBUFFERED": "1"}))
            # Each process serves Prometheus /metrics (infra/observability.py) while the loop runs.
            metrics_ports = {name: free_port() for name in ("stream-worker", "rank-server", "trainer")}
            run.facts["metrics"] = {n: f"http://127.0.0.1:{p}/metrics" for n, p in metrics_ports.items()}
            store_args = ["--backend", opts.backend, "--repo-dir", feature_repo]
            if redis_url:
                store_args += ["--redis-url", redis_url]
            sup.start(
                "stream-worker",
                "hisam.jobs.stream_worker",
                [
                    "--bootstrap",
                    broker.bootstrap,
                    *store_args,
                    "--tokenizer",
                    tokenizer,
                    "--instance-id",
                    "loop-0",
                    "--metrics-port",
                    metrics_ports["stream-worker"],
                ],
            )
            run.facts |= {"bootstrap": broker.bootstrap, "triton": triton.url, "work_dir": str(work)}

        producer = prod.make_producer(broker.bootstrap)
        stack.callback(producer.close)
        offsets = Offsets(broker.bootstrap, client_id="hisam-loop")
        stack.callback(offsets.close)
        with run.stage("backfill", 5):
            st = prod.produce_items(producer, prod.item_events(ds.items, int(time.time() * 1000)))
            run.facts["items_produced"] = st.sent
            _wait_with_bar(run, offsets, tp.ITEM_EVENTS, st.sent, "items", sup)
            t0 = time.perf_counter()
            st = prod.produce_actions(producer, prod.actions_from_interactions(ds.train, ds.name))
            run.facts["backfill_actions"] = st.sent
            _wait_with_bar(run, offsets, tp.USER_ACTIONS, st.sent, "backfill", sup)
            run.facts["backfill_actions_per_s"] = round(st.sent / (time.perf_counter() - t0), 1)
            commit_at_end(offsets, broker.bootstrap, TRAINER_GROUP, tp.TRAINING_SAMPLES)

        rank = sup.start(
            "rank-server",
            "hisam.jobs.serve",
            ["--port", "0", "--triton-url", triton.url, "--model-repo", repo, "--checkpoint", checkpoint,
             "--dataset", opts.dataset, "--data-dir", opts.data_dir, *store_args,
             "--metrics-port", metrics_ports["rank-server"]],
        )  # fmt: skip
        address = rank.wait_for_line("RankingService listening on", 120).rsplit(" ", 1)[-1]
        sup.start(
            "trainer",
            "hisam.jobs.trainer_run",
            ["--checkpoint", checkpoint, "--state-dir", state_dir, "--model-repo", repo,
             "--bootstrap", broker.bootstrap, "--group-id", TRAINER_GROUP, "--triton-url", triton.url,
             "--dataset", opts.dataset, "--data-dir", opts.data_dir, "--threads", str(opts.threads),
             "--lr", str(opts.trainer_lr), "--min-samples", str(opts.min_samples),
             "--probation", str(opts.min_samples), "--metrics-port", metrics_ports["trainer"]],
        )  # fmt: skip
        run.facts["rank_address"] = address

        store = open_stream_store(OnlineStoreConfig(backend=opts.backend, repo_dir=feature_repo, redis_url=redis_url))
        stack.callback(store.close)
        run.probe = FreshnessProbe(store, opts.probe_every).start()
        stack.callback(run.probe.stop)
        run.sampler = RankSampler(address, ds.items.ids, opts.candidates, opts.rank_interval_s, opts.seed).start()
        stack.callback(run.sampler.stop)

        test = ds.test.sort_values("timestamp", kind="stable")
        if opts.replay_limit:
            test = test.head(opts.replay_limit)
        with run.stage("replay", 6):
            _replay(run, producer, prod, test, ds.name, offsets, state_dir, repo, sup)
        with run.stage("drain", 7):
            t_start = time.perf_counter()
            left = wait_drained(offsets, STREAM_GROUP, tp.USER_ACTIONS, opts.drain_timeout_s)
            run.facts["stream_lag_left"] = left
            budget = max(5.0, opts.drain_timeout_s - (time.perf_counter() - t_start))
            run.facts["trainer_lag_left"] = wait_drained(
                offsets, TRAINER_GROUP, tp.TRAINING_SAMPLES, budget, on_tick=lambda *_: sup.check()
            )
            run.sampler.stop()
            run.facts["sample_calls"] = _sample_calls(run.sampler, test, ds.items.ids, opts.candidates)
            row = _progress_row(run, offsets, 0.0, len(test), len(test), state_dir, repo)
            run.facts["final"] = row
            run.facts["trainer"] = _trainer_snapshot(state_dir, repo)
            run.facts["stream_appended"], _ = offsets.position(STREAM_GROUP, tp.USER_ACTIONS)
            run.facts["dead_letters"] = row["dead_letters"]
            _save_metrics(run.facts.get("metrics", {}), work / "metrics")
            run.facts["exit_codes"] = sup.stop_all()


def _save_metrics(endpoints: dict[str, str], out: Path) -> None:
    """Each process's last /metrics page, kept beside its log (what Prometheus would have scraped)."""
    import urllib.request

    out.mkdir(parents=True, exist_ok=True)
    for name, url in endpoints.items():
        try:
            (out / f"{name}.prom").write_bytes(urllib.request.urlopen(url, timeout=5).read())
        except OSError as e:
            log.warning("could not scrape %s at %s: %s", name, url, e)


def _wait_with_bar(run: Run, offsets: Offsets, topic: str, total: int, label: str, sup) -> None:
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit="ev", disable=not run.opts.progress, mininterval=1.0) as bar:

        def tick(consumed: int, lag: int) -> None:
            sup.check()
            bar.n = min(consumed, total)
            bar.refresh()

        left = wait_drained(offsets, STREAM_GROUP, topic, 600.0, tick)
    if left:
        raise RuntimeError(f"the stream worker did not catch up with {topic}: {left} records left after 600s")


def _replay(run: Run, producer, prod, test, dataset_name: str, offsets: Offsets, state_dir, repo, sup) -> None:
    """The test period through ``stream.producer.produce_actions`` at the run's rate, with a per-send hook."""
    opts = run.opts
    events = list(prod.actions_from_interactions(test, dataset_name))
    total = len(events)
    t_start = time.perf_counter()
    state = {"next_tick": t_start + opts.progress_every_s, "prev": None}

    def sent(n: int) -> None:
        e, now = events[n], time.perf_counter()
        run.sampler.recent.append(int(e.user_id))
        if n % opts.probe_every == 0:
            producer.flush()  # the probe times produce -> visible, not time spent in the client's buffer
            run.probe.submit(int(e.user_id), e.event_id, now)
        if now >= state["next_tick"]:
            sup.check()
            row = _progress_row(run, offsets, t_start, n + 1, total, state_dir, repo)
            run.timeline.append(row)
            log.info("%s", progress_line(row, state["prev"]))
            state["prev"], state["next_tick"] = row, now + opts.progress_every_s

    prod.produce_actions(producer, events, rate=opts.rate, on_sent=sent)
    run.facts["replay_actions"] = total
    run.facts["replay_s"] = round(time.perf_counter() - t_start, 1)


def _sample_calls(sampler: RankSampler, test, items: np.ndarray, k: int) -> list[dict]:
    """Three Rank calls for users of the replay: what a new user sees the system answer."""
    import grpc

    from hisam_pb.v1 import rank_pb2_grpc

    users = list(dict.fromkeys(int(u) for u in test["user_idx"].to_numpy()[::-1]))[:3]
    out = []
    with grpc.insecure_channel(sampler.address) as channel:
        stub = rank_pb2_grpc.RankingServiceStub(channel)
        for u in users:
            out.append(sampler.call(stub, u, [int(i) for i in items[:k]]))
    return out


# --- the report -------------------------------------------------------------------------------


def summary_of(run: Run) -> dict:
    """The figures of a run as plain values (``summary.json``; the report's tables)."""
    import os
    import platform

    f = run.facts
    probe, sampler = run.probe, run.sampler
    calls = sampler.calls if sampler else []
    ok = [c["ms"] for c in calls if c["ok"]]
    versions: dict[str, int] = {}
    for c in calls:
        if c["ok"]:
            versions[c["model_version"]] = versions.get(c["model_version"], 0) + 1
    trainer = f.get("trainer", {})
    lineage = trainer.get("lineage", [])
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "interrupted": run.interrupted,
        "error": run.error,
        "options": {k: str(v) for k, v in vars(run.opts).items()},
        "stages_s": run.stages,
        "events": {
            "items_produced": f.get("items_produced"),
            "backfill_actions": f.get("backfill_actions"),
            "backfill_actions_per_s": f.get("backfill_actions_per_s"),
            "replay_actions": f.get("replay_actions"),
            "replay_s": f.get("replay_s"),
            "appended_committed": f.get("stream_appended"),
            "dead_letters": f.get("dead_letters"),
            "stream_lag_left": f.get("stream_lag_left"),
        },
        "freshness_ms": {
            "probes": len(probe.latencies_ms) if probe else 0,
            "timeouts": probe.timeouts if probe else 0,
            "p50": percentile(probe.latencies_ms, 50) if probe else None,
            "p99": percentile(probe.latencies_ms, 99) if probe else None,
        },
        "trainer": {
            "trained": trainer.get("trained"),
            "serving_version": trainer.get("serving_version"),
            "window_metrics": trainer.get("window_metrics"),
            "lag_left": f.get("trainer_lag_left"),
            "published": [
                {k: r.get(k) for k in ("version", "parent", "publish_latency_s", "model_version")}
                for r in lineage
                if r.get("event") == "published"
            ],
            "refused": sum(r.get("event") == "refused" for r in lineage),
            "rollbacks": sum(r.get("event") == "rollback" for r in lineage),
        },
        "rank": {
            "calls": len(calls),
            "errors": sum(not c["ok"] for c in calls),
            "error_examples": [c["error"] for c in calls if not c["ok"]][:5],
            "p50_ms": percentile(ok, 50),
            "p99_ms": percentile(ok, 99),
            "max_ms": max(ok) if ok else None,
            "answered_by_version": versions,
        },
        "sample_calls": f.get("sample_calls", []),
        "work_dir": str(run.work),
    }


def _plot(run: Run, path: Path) -> Path | None:
    rows = run.timeline
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(12, 7.5))
    rates = [0.0] + [(b["appended"] - a["appended"]) / max(1e-9, b["t"] - a["t"]) for a, b in itertools.pairwise(rows)]
    ax[0, 0].plot(t, rates, label="appended / s")
    ax[0, 0].plot(t, [r["stream_lag"] for r in rows], label="stream lag (records)")
    ax[0, 0].set(title="Stream ingest", xlabel="replay time (s)")
    ax[0, 0].legend()
    ax[0, 1].plot(t, [r["fresh_p50_ms"] for r in rows], label="p50")
    ax[0, 1].plot(t, [r["fresh_p99_ms"] for r in rows], label="p99")
    ax[0, 1].set(title="Freshness: produce -> visible in the store", xlabel="replay time (s)", ylabel="ms")
    ax[0, 1].legend()
    calls = run.sampler.calls if run.sampler else []
    t0 = calls[0]["t"] if calls else 0.0
    by_version: dict[str, list] = {}
    for c in calls:
        if c["ok"]:
            by_version.setdefault(c["model_version"] or "?", []).append((c["t"] - t0, c["ms"]))
    for v, pts in sorted(by_version.items()):
        xs, ys = zip(*pts, strict=True)
        ax[1, 0].scatter(xs, ys, s=6, label=f"model {v}")
    errs = [c["t"] - t0 for c in calls if not c["ok"]]
    if errs:
        ax[1, 0].scatter(errs, [0] * len(errs), marker="x", color="red", label="error")
    ax[1, 0].set(title="Rank latency per call", xlabel="time (s)", ylabel="ms")
    ax[1, 0].legend(fontsize=7)
    models = sorted({m for r in rows for m in r["auc"]})
    for m in models:
        ax[1, 1].plot(t, [r["auc"].get(m) if r["auc"].get(m) is not None else math.nan for r in rows], label=m)
    ax[1, 1].set(title="Trainer: prequential AUC (rolling window)", xlabel="replay time (s)")
    if models:
        ax[1, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(x, fmt: str = "{:.1f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x) if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def write_report(run: Run, out_dir: Path) -> Path:
    """``report.md`` (tables), ``timeline.png`` and ``summary.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary_of(run)
    (out_dir / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    (out_dir / "timeline.json").write_text(json.dumps(run.timeline, default=float))
    plot = _plot(run, out_dir / "timeline.png")
    ev, fr, tr, rk = s["events"], s["freshness_ms"], s["trainer"], s["rank"]
    lines = [
        "# hisam: the whole loop",
        "",
        (
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {s['machine']}; online store: {run.opts.backend}; "
            f"dataset: {run.opts.dataset}; work dir `{run.work}`."
        ),
    ]
    if run.interrupted:
        lines += ["", "**Interrupted (Ctrl-C): the figures cover the run up to that point.**"]
    if run.error:
        lines += ["", f"**Failed:** {run.error}"]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["stages_s"].items()]
    lines += [
        "",
        "## Events",
        "",
        "| measure | value |",
        "|---|---|",
        f"| item events produced and tokenized | {_cell(ev['items_produced'])} |",
        f"| backfill actions (training period) | {_cell(ev['backfill_actions'])} |",
        f"| backfill ingest rate (actions/s, one worker) | {_cell(ev['backfill_actions_per_s'])} |",
        f"| replayed actions (test period) | {_cell(ev['replay_actions'])} in {_cell(ev['replay_s'])} s |",
        f"| actions committed by the stream worker | {_cell(ev['appended_committed'])} |",
        f"| dead letters | {_cell(ev['dead_letters'])} |",
        (
            f"| freshness p50 / p99 (produce -> visible in the store) | {_cell(fr['p50'])} / {_cell(fr['p99'])} ms "
            f"({fr['probes']} probes, {fr['timeouts']} timeouts) |"
        ),
        "",
        "## Near-line trainer",
        "",
        (
            f"Trained on {_cell(tr['trained'])} samples; serving version {_cell(tr['serving_version'])}; "
            f"{len(tr['published'])} version(s) published, {tr['refused']} refused by the gate, "
            f"{tr['rollbacks']} rollback(s); samples left unconsumed at the end: {_cell(tr['lag_left'])}."
        ),
        "",
        "| version | parent | publish latency (s) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {p['version']} | {_cell(p['parent'])} | {_cell(p['publish_latency_s'], '{:.2f}')} |"
        for p in tr["published"]
    ] or ["| - | - | - |"]
    wm = tr.get("window_metrics") or {}
    if wm:
        lines += ["", "| model (prequential, rolling window) | AUC | GAUC | n |", "|---|---|---|---|"]
        lines += [
            f"| {m} | {_cell(v.get('auc'), '{:.4f}')} | {_cell(v.get('gauc'), '{:.4f}')} | {_cell(v.get('n'))} |"
            for m, v in sorted(wm.items())
        ]
    lines += [
        "",
        "## Rank",
        "",
        (
            f"{rk['calls']} calls during the replay ({run.opts.candidates} candidates each), {rk['errors']} errors; "
            f"latency p50 {_cell(rk['p50_ms'])} ms, p99 {_cell(rk['p99_ms'])} ms, max {_cell(rk['max_ms'])} ms."
        ),
        "",
        "| answered by model version | calls |",
        "|---|---|",
    ]
    lines += [f"| {v or '-'} | {n} |" for v, n in sorted(rk["answered_by_version"].items())] or ["| - | 0 |"]
    if rk["error_examples"]:
        lines += ["", "Errors: " + "; ".join(rk["error_examples"])]
    if s["sample_calls"]:
        lines += ["", "Sample calls after the replay:", "", "| user | history | model | ms | top 5 (item, score) |"]
        lines += ["|---|---|---|---|---|"]
        for c in s["sample_calls"]:
            if c["ok"]:
                top = ", ".join(f"{i} ({sc:.3f})" for i, sc in c["top"])
                lines.append(f"| {c['user']} | {c['history_len']} | {c['model_version']} | {c['ms']:.0f} | {top} |")
            else:
                lines.append(f"| {c['user']} | - | - | {c['ms']:.0f} | {c['error']} |")
    if plot:
        lines += ["", f"![timeline]({plot.name})"]
    lines += [
        "",
        f"Process logs: `{run.work / 'logs'}`; each process's last Prometheus page: `{run.work / 'metrics'}`.",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
