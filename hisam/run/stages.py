"""The loop's stages, one function each, in the order ``hisam run`` runs them (hisam/run/loop.py).

Every stage that trains something reuses its artifact when it is there and still valid,
so that a second ``make run`` goes straight to the services. The long-lived services run
as supervised child processes (infra/supervisor.py): a crashed one stops the loop with
its log instead of a silent stall.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hisam.run.probes import RecentUsers, last_users_requests, progress_line, progress_row, trainer_snapshot
from hisam.run.state import STREAM_GROUP, TRAINER_GROUP, LoopOptions, Run
from infra.kafka import Offsets, commit_at_end
from serving.load import rank_calls

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from data import Dataset
    from features.store import OnlineStoreConfig
    from infra.supervisor import Supervisor

log = logging.getLogger(__name__)

CATCH_UP_TIMEOUT_S = 600.0  # the stream worker's catch-up on the backfill
# The Rank server exports --checkpoint again to learn its content version before it finds it
# published (serving/repository.py): as long as the services stage's export, minutes on a busy
# 2-core machine.
RANK_START_TIMEOUT_S = 600.0


# --- 1-3: dataset, tokenizer, initial ranker ------------------------------------------------------


def load_data(opts: LoopOptions) -> Dataset:
    """ML-100K (downloaded once) or a directory in the bring-your-own format, with its item modalities."""
    from data import load_dataset

    return load_dataset(opts.dataset, str(opts.data_dir), progress=opts.progress)


def ensure_tokenizer(opts: LoopOptions, ds: Dataset) -> Path:
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
    """The initial ranker, PT then SFT from it (docs/method.md §3); reused when it matches the tokenizer."""
    from models.hmat.checkpoint import read_checkpoint_config
    from models.tokenizer import FrozenTokenizer
    from recipes.ranker.runs import train_runs

    out = opts.artifacts / "ranker"
    final = out / "hmat" / f"seed{opts.seed}" / "finetune"
    version = FrozenTokenizer.load(tokenizer).version
    with contextlib.suppress(FileNotFoundError, OSError, KeyError, ValueError):
        cfg = read_checkpoint_config(final)
        if cfg["tokenizer_version"] == version and cfg["model"]["max_items"] == opts.max_items:
            log.info("ranker: reusing %s", final)
            return final
    log.info("ranker: pre-training (PT)")
    if train_runs(_ranker_options(opts, tokenizer, out, opts.pt_epochs), "pt", "pretrain") != 0:
        raise RuntimeError("pre-training the initial ranker failed (see the log above)")
    log.info("ranker: fine-tuning (SFT) from PT")
    sft = _ranker_options(opts, tokenizer, out, opts.sft_epochs)
    if train_runs(sft, "sft", "finetune", lambda run: run / "pretrain") != 0:
        raise RuntimeError("fine-tuning the initial ranker failed (see the log above)")
    return final


def _ranker_options(opts: LoopOptions, tokenizer: Path, out: Path, epochs: int) -> argparse.Namespace:
    """The ranker training options (recipes/ranker/runs.py takes them as a namespace): the
    defaults of ``hisam ranker pretrain|finetune``, with the loop's CPU preset, short history
    and few warm-up steps."""
    from recipes.ranker.runs import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser, default_epochs=epochs, default_lr=1e-3)
    options = parser.parse_args([])  # the defaults; the loop's own values below
    vars(options).update(
        dataset=opts.dataset,
        data_dir=str(opts.data_dir),
        tokenizer=tokenizer,
        out=out,
        max_items=opts.max_items,
        seeds=[opts.seed],
        threads=opts.threads,
        epochs=epochs,
        warmup_steps=20,
        no_progress=not opts.progress,
    )
    return options


# --- 4: services ----------------------------------------------------------------------------------


@dataclass
class Services:
    """What the later stages need of the started services."""

    bootstrap: str
    triton_url: str
    supervisor: Supervisor
    metrics_ports: dict[str, int]
    store: OnlineStoreConfig  # the online store the stream worker writes and Rank reads
    repo: Path  # the model repository Triton serves
    state_dir: Path  # the trainer's

    def store_args(self) -> list:
        """The online-store options of every service of the loop."""
        args = ["--backend", self.store.backend, "--repo-dir", self.store.repo_dir]
        return args + ["--redis-url", self.store.redis_url] if self.store.redis_url else args


def start_services(stack: contextlib.ExitStack, run: Run, tokenizer: Path, checkpoint: Path) -> Services:
    """The broker, Redis (``--backend redis``), Triton on the initial ranker as version 1, the stream worker.

    Everything started is stopped by ``stack``, in reverse order.
    """
    from features.store import OnlineStoreConfig
    from infra.ports import free_port
    from infra.services import kafka_broker, redis_server
    from infra.supervisor import Supervisor
    from infra.triton import triton_server
    from serving.repository import publish_version
    from stream import topics as tp

    opts, work = run.opts, run.work
    broker = stack.enter_context(kafka_broker(data_dir=work / "kafka"))
    redis_url = stack.enter_context(redis_server()).url if opts.backend == "redis" else None
    tp.ensure_topics(broker.bootstrap, tp.default_topics(4))
    repo = work / "model_repo"
    publish_version(repo, checkpoint)
    triton = stack.enter_context(triton_server(repo, poll_s=1.0, log_dir=work / "logs"))
    sup = stack.enter_context(Supervisor(work / "logs", env={"PYTHONUNBUFFERED": "1"}))
    # Each process serves Prometheus /metrics (infra/observability.py) while the loop runs.
    metrics_ports = {name: free_port() for name in ("stream-worker", "rank-server", "trainer")}
    store = OnlineStoreConfig(backend=opts.backend, repo_dir=work / "feature_repo", redis_url=redis_url)
    services = Services(broker.bootstrap, triton.url, sup, metrics_ports, store, repo, work / "trainer")
    run.facts["metrics"] = {n: f"http://127.0.0.1:{p}/metrics" for n, p in metrics_ports.items()}
    sup.start(
        "stream-worker",
        "hisam.jobs.stream_worker",
        ["--bootstrap", broker.bootstrap, *services.store_args(), "--tokenizer", tokenizer,
         "--instance-id", "loop-0", "--metrics-port", metrics_ports["stream-worker"]],
    )  # fmt: skip
    run.facts |= {"bootstrap": broker.bootstrap, "triton": triton.url, "work_dir": str(work)}
    return services


def start_rank_and_trainer(run: Run, services: Services, checkpoint: Path) -> str:
    """The Rank server and the near-line trainer, once the backfill is in; returns Rank's address.

    The trainer starts after ``backfill`` placed its group at the end of training-samples:
    the initial ranker was trained on those samples already.
    """
    opts, sup = run.opts, services.supervisor
    rank = sup.start(
        "rank-server",
        "hisam.jobs.serve",
        ["--port", "0", "--triton-url", services.triton_url, "--model-repo", services.repo,
         "--checkpoint", checkpoint, "--dataset", opts.dataset, "--data-dir", opts.data_dir,
         *services.store_args(), "--metrics-port", services.metrics_ports["rank-server"],
         "--tombstones-bootstrap", services.bootstrap],
    )  # fmt: skip
    address = rank.wait_for_line("RankingService listening on", RANK_START_TIMEOUT_S).rsplit(" ", 1)[-1]
    sup.start(
        "trainer",
        "hisam.jobs.trainer_run",
        ["--checkpoint", checkpoint, "--state-dir", services.state_dir, "--model-repo", services.repo,
         "--bootstrap", services.bootstrap, "--group-id", TRAINER_GROUP, "--triton-url", services.triton_url,
         "--dataset", opts.dataset, "--data-dir", opts.data_dir, "--threads", str(opts.threads),
         "--lr", str(opts.trainer_lr), "--min-samples", str(opts.min_samples),
         "--probation", str(opts.min_samples), "--metrics-port", services.metrics_ports["trainer"]],
    )  # fmt: skip
    run.facts["rank_address"] = address
    return address


# --- 5: backfill ----------------------------------------------------------------------------------


def backfill(run: Run, services: Services, producer, offsets: Offsets, ds: Dataset) -> None:
    """Every item, then the training period's actions, through the stream: every user has a history.

    The trainer's group is then placed at the end of training-samples (those samples
    trained the initial ranker already).
    """
    from stream import producer as prod
    from stream import topics as tp

    st = prod.produce_items(producer, prod.item_events(ds.items, int(time.time() * 1000)))
    run.facts["items_produced"] = st.sent
    _wait_with_bar(run, services, offsets, tp.ITEM_EVENTS, st.sent, "items")
    t0 = time.perf_counter()
    st = prod.produce_actions(producer, prod.actions_from_interactions(ds.train, ds.name))
    run.facts["backfill_actions"] = st.sent
    _wait_with_bar(run, services, offsets, tp.USER_ACTIONS, st.sent, "backfill")
    run.facts["backfill_actions_per_s"] = round(st.sent / (time.perf_counter() - t0), 1)
    commit_at_end(offsets, services.bootstrap, TRAINER_GROUP, tp.TRAINING_SAMPLES)


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


def _wait_with_bar(run: Run, services: Services, offsets: Offsets, topic: str, total: int, label: str) -> None:
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit="ev", disable=not run.opts.progress, mininterval=1.0) as bar:

        def tick(consumed: int, lag: int) -> None:
            services.supervisor.check()
            bar.n = min(consumed, total)
            bar.refresh()

        left = wait_drained(offsets, STREAM_GROUP, topic, CATCH_UP_TIMEOUT_S, tick)
    if left:
        raise RuntimeError(
            f"the stream worker did not catch up with {topic}: {left} records left after {CATCH_UP_TIMEOUT_S:.0f}s"
        )


# --- 6: replay ------------------------------------------------------------------------------------


def replay(
    run: Run, services: Services, producer, offsets: Offsets, test: pd.DataFrame, dataset_name: str, users: RecentUsers
) -> None:
    """The test period through ``stream.producer.produce_actions`` at the run's rate, as live traffic.

    Every sent action is a user the Rank caller may ask about next; one in ``probe_every``
    is timed by the freshness probe; a progress row every ``progress_every_s``.
    """
    from stream import producer as prod

    opts, sup = run.opts, services.supervisor
    events = list(prod.actions_from_interactions(test, dataset_name))
    total = len(events)
    t_start = time.perf_counter()
    state = {"next_tick": t_start + opts.progress_every_s, "prev": None}

    def sent(n: int) -> None:
        e, now = events[n], time.perf_counter()
        users.seen(int(e.user_id))
        if n % opts.probe_every == 0:
            producer.flush()  # the probe times produce -> visible, not time spent in the client's buffer
            run.probe.submit(int(e.user_id), e.event_id, now)
        if now >= state["next_tick"]:
            sup.check()
            row = _progress(run, services, offsets, now - t_start, n + 1, total)
            run.timeline.append(row)
            log.info("%s", progress_line(row, state["prev"]))
            state["prev"], state["next_tick"] = row, now + opts.progress_every_s

    prod.produce_actions(producer, events, rate=opts.rate, on_sent=sent)
    run.facts["replay_actions"] = total
    run.facts["replay_s"] = round(time.perf_counter() - t_start, 1)


def _progress(run: Run, services: Services, offsets: Offsets, t: float, produced: int, total: int) -> dict:
    calls = run.caller.calls if run.caller else []
    return progress_row(offsets, run.probe, calls, t, produced, total, services.state_dir, services.repo)


# --- 7: drain -------------------------------------------------------------------------------------


def drain(run: Run, services: Services, offsets: Offsets, test: pd.DataFrame, items: np.ndarray) -> None:
    """Wait (bounded) for the stream and the trainer to catch up, ask Rank about the replay's last
    users, keep the final figures and each process's last /metrics page, stop the children."""
    from stream import topics as tp

    opts, sup = run.opts, services.supervisor
    t_start = time.perf_counter()
    run.facts["stream_lag_left"] = wait_drained(offsets, STREAM_GROUP, tp.USER_ACTIONS, opts.drain_timeout_s)
    budget = max(5.0, opts.drain_timeout_s - (time.perf_counter() - t_start))
    run.facts["trainer_lag_left"] = wait_drained(
        offsets, TRAINER_GROUP, tp.TRAINING_SAMPLES, budget, on_tick=lambda *_: sup.check()
    )
    run.caller.close()
    requests = last_users_requests(test["user_idx"].to_numpy(), items, opts.candidates)
    run.facts["sample_calls"] = rank_calls(run.caller.address, requests)
    since_replay = run.facts.get("replay_s", 0.0) + time.perf_counter() - t_start
    row = _progress(run, services, offsets, since_replay, len(test), len(test))
    run.facts["final"] = row
    run.facts["trainer"] = trainer_snapshot(services.state_dir, services.repo)
    run.facts["stream_appended"], _ = offsets.position(STREAM_GROUP, tp.USER_ACTIONS)
    run.facts["dead_letters"] = row["dead_letters"]
    _save_metrics(run.facts.get("metrics", {}), run.work / "metrics")
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
