"""The trainer killed at every step of a publish and of a rollback; a hung Triton; a held repository lock.

A kill is real: the trainer runs in a forked child that dies with ``os._exit`` at the armed
step (trainer/faults.py, serving/repository.py's ``FaultPoint``), or right after the step
that published or rolled back but before its snapshot. Then a new trainer starts on the
same state directory and repository (the restart), and must serve exactly one complete
version: the repository's newest complete one, with its weights, every model directory
holding only complete versions, nothing staged or half hidden, and the lineage's last
serving change naming it. Publishing writes real Triton repository versions from the traced
template; Triton itself is in test_trainer_triton_e2e.py and test_trainer_killed_mid_publish.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from export.graphs import model_version
from models.hmat.checkpoint import save_checkpoint
from serving.repository import GRAPH_MODELS, RepositoryLocked, published_versions
from trainer.config import ServiceConfig, TrainerConfig
from trainer.faults import Faults, corrupt
from trainer.nearline import NearlineTrainer
from trainer.publisher import TritonWatch, rollback_to
from trainer.service import TrainerService
from trainer.testing import TOKENIZER, profile_of, synthetic_examples, tiny_trainer

# A gate that passes any finite candidate after 96 samples, and a probation of 64 rows.
LAX = {"lr": 3e-3, "ema": 0.0, "batch_size": 32, "window": 400, "min_samples": 96, "gate_window": 96}
LAX |= {"margin": 1.0, "min_improvement": -1.0, "probation": 64}
EVENTS = synthetic_examples(480, seed=4)
SERVING_EVENTS = ("bootstrap", "adopted", "published", "recovered", "rollback")


def make(root: Path, learned: Path, template_dir: Path, **kw) -> TrainerService:
    trainer = NearlineTrainer.from_checkpoint(learned, profile_of, TrainerConfig(**LAX))
    cfg = ServiceConfig(
        bootstrap="unused:0", state_dir=root / "state", repo=root / "repo", template_dir=template_dir, **kw
    )
    return TrainerService(trainer, cfg)


def feed(svc: TrainerService, start: int, end: int) -> None:
    t = svc.trainer
    t.process(EVENTS[start:end])
    t.offsets = {"training-samples:0": end}


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Path:
    """A warm start that has learned the synthetic stream (the version a bad publish is judged against)."""
    t = tiny_trainer()
    for i in range(0, 256, 32):
        t.process(EVENTS[i : i + 32])
    out = tmp_path_factory.mktemp("learned") / "ckpt"
    return save_checkpoint(out, t.learner.candidate, tokenizer_version=TOKENIZER, meta={"variant": "hmat"})


@pytest.fixture(scope="module")
def before_publish(tmp_path_factory, learned, template_dir) -> Path:
    """Version 1 serving, 64 samples since: the next 32 open the gate (snapshot on disk)."""
    root = tmp_path_factory.mktemp("before-publish") / "root"
    svc = make(root, learned, template_dir)
    svc.restore_or_bootstrap()
    for i in (256, 288):
        feed(svc, i, i + 32)
        svc.step()
    svc._snapshot()
    return root


@pytest.fixture(scope="module")
def before_rollback(tmp_path_factory, before_publish, learned, template_dir) -> Path:
    """Version 2 (a corrupted candidate) on probation against version 1, 32 rows judged: the next 32 fail it."""
    root = tmp_path_factory.mktemp("before-rollback") / "root"
    shutil.copytree(before_publish, root, symlinks=True)
    svc = make(root, learned, template_dir)
    svc.restore_or_bootstrap()
    feed(svc, 320, 352)
    corrupt(svc.trainer.learner.candidate, "scramble")
    svc.step()
    assert svc.trainer.serving_version == 2 and svc.trainer.parent_version == 1
    svc._snapshot()
    feed(svc, 352, 384)
    svc.step()
    assert svc.trainer.serving_version == 2
    svc._snapshot()
    return root


def _crash(root: Path, learned: Path, template_dir: Path, point: str | None, batch: tuple[int, int]) -> int:
    """A trainer on ``root`` takes one batch and one step, dying at ``point`` (None: after the step,
    before its snapshot). Returns the child's exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            faults = Faults(exit_in_publish=point) if point else Faults()  # type: ignore[arg-type]
            svc = make(root, learned, template_dir, faults=faults)
            svc.restore_or_bootstrap()
            feed(svc, *batch)
            svc.step()
        except BaseException:  # noqa: BLE001 - report it, exit non-zero
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the trainer child (fault {point}) did not finish within 300s")


def _check_restart(root: Path, learned: Path, template_dir: Path) -> int:
    """Restart on ``root``; asserts one complete version serves, everywhere; returns it."""
    svc = make(root, learned, template_dir)
    svc.restore_or_bootstrap()
    repo, t = root / "repo", svc.trainer
    versions = published_versions(repo)
    newest = max(versions)
    assert t.serving_version == newest, (t.serving_version, versions)
    assert model_version(t.learner.serving) == versions[newest]  # its weights, not only its number
    for m in GRAPH_MODELS.values():  # what Triton's poller sees: complete versions only
        assert sorted(int(d.name) for d in (repo / m).iterdir() if d.name.isdigit()) == sorted(versions), m
    assert not [p for p in root.iterdir() if ".staging-" in p.name or p.name.endswith(".hiding")]
    changes = [r for r in svc.state.lineage() if r["event"] in SERVING_EVENTS]
    last = changes[-1]
    assert (last["to"] if last["event"] == "rollback" else last["version"]) == newest, changes[-3:]
    return newest


PUBLISH_STEPS = [
    ("weights_saved", 137, 1),  # the weights in the state, nothing in the repository
    ("staged", 137, 1),
    ("first_moved", 137, 1),
    ("second_moved", 137, 1),
    ("moved", 137, 2),  # complete, unrecorded: adopted on restart, on probation
    (None, 0, 2),  # recorded in the lineage, the snapshot not written
]


@pytest.mark.parametrize(("point", "code", "serving"), PUBLISH_STEPS)
def test_a_trainer_killed_at_any_step_of_a_publish_restarts_serving_one_complete_version(
    point, code, serving, before_publish, learned, template_dir, tmp_path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(before_publish, root, symlinks=True)
    assert _crash(root, learned, template_dir, point, (320, 352)) == code
    assert _check_restart(root, learned, template_dir) == serving


ROLLBACK_STEPS = ["hide_intent", "hide_first_moved", "hide_second_moved", "hidden", None]


@pytest.mark.parametrize("point", ROLLBACK_STEPS)
def test_a_trainer_killed_at_any_step_of_a_rollback_restarts_serving_the_parent(
    point, before_rollback, learned, template_dir, tmp_path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(before_rollback, root, symlinks=True)
    assert _crash(root, learned, template_dir, point, (384, 416)) == (137 if point else 0)
    assert _check_restart(root, learned, template_dir) == 1
    assert sorted(published_versions(root / "repo")) == [1]  # the withdrawn version never came back


@pytest.fixture
def hung_triton():
    """A real socket that accepts connections and never answers (a stuck Triton)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for c in conns:
        c.close()
    srv.close()


def test_a_hung_triton_fails_the_wait_on_time(hung_triton) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"Triton at {hung_triton} did not serve version 2 .* within 1.5s"):
        TritonWatch(hung_triton).wait_serving(2, timeout_s=1.5)
    assert time.monotonic() - t0 < 5


def test_a_hung_triton_fails_the_publish_and_the_trainer_goes_on(
    hung_triton, before_publish, learned, template_dir, tmp_path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(before_publish, root, symlinks=True)
    svc = make(root, learned, template_dir, triton_url=hung_triton, publish_timeout_s=1.5, background_publish=False)
    svc.restore_or_bootstrap()
    feed(svc, 320, 352)
    t0 = time.monotonic()
    svc.step()  # the gate passes, the publish waits for Triton at most publish_timeout_s
    assert time.monotonic() - t0 < 30
    refused = svc.state.lineage()[-1]
    assert refused["event"] == "refused" and refused["reason"] == "not_served" and refused["metrics"]["version"] == 2
    assert "did not serve version 2" in refused["metrics"]["detail"]
    assert svc.publisher.in_flight is None and svc.trainer.serving_version == 1
    assert sorted(published_versions(root / "repo")) == [1]  # withdrawn again
    feed(svc, 352, 384)
    svc.step()  # the loop goes on
    assert svc.trainer.trained == 384 - 256


HOLD = """
import sys
from serving.repository import repository_lock
with repository_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_held_repository_lock_defers_publish_and_rollback_with_a_clear_error(
    before_publish, learned, template_dir, tmp_path
) -> None:
    root = tmp_path / "root"
    shutil.copytree(before_publish, root, symlinks=True)
    repo = root / "repo"
    svc = make(root, learned, template_dir, lock_timeout_s=0.3)
    svc.restore_or_bootstrap()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(repo)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # a `hisam trainer rollback` in progress, say
        with pytest.raises(RepositoryLocked, match=f"pid {holder.pid}"):
            rollback_to(repo, 1, lock_timeout_s=0.3)
        # The command says so and exits EX_TEMPFAIL, having changed nothing.
        from hisam.jobs import trainer_rollback

        args = argparse.Namespace(model_repo=repo, state_dir=root / "state", to=1, reason="test", lock_timeout=0.3)
        assert trainer_rollback.main(args) == trainer_rollback.EXIT_LOCKED
        feed(svc, 320, 352)
        svc.step()  # the gate passes; the publish finds the repository locked
        refused = svc.state.lineage()[-1]
        assert refused["event"] == "refused" and refused["reason"] == "repository_locked", refused
        assert sorted(published_versions(repo)) == [1] and svc.trainer.serving_version == 1
    finally:
        holder.stdin.close()
        holder.wait(30)
    feed(svc, 352, 384)
    svc.step()  # the gate asks again, and now publishes
    assert svc.trainer.serving_version == 2 and sorted(published_versions(repo)) == [1, 2]


def test_faults_cover_every_step_of_a_publish_and_a_rollback() -> None:
    from trainer.faults import FAULT_POINTS

    armed = {p for p, _, _ in PUBLISH_STEPS} | set(ROLLBACK_STEPS)
    assert set(FAULT_POINTS) == armed - {None}
    assert dataclasses.replace(Faults(), exit_in_publish="hidden").exit_in_publish == "hidden"
