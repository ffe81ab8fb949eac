"""What one loop is given (``LoopOptions``) and what it has measured so far (``Run``).

The run is filled in as the stages go, so that an interrupted or failed loop still
reports everything measured up to that point.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data import default_data_dir

if TYPE_CHECKING:
    from hisam.run.probes import FreshnessProbe
    from serving.load import RankCaller

log = logging.getLogger(__name__)

STREAM_GROUP = "hisam-stream"  # the stream worker's app id = its consumer group
TRAINER_GROUP = "hisam-trainer"
N_STAGES = 7


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


@dataclass
class Run:
    """Everything measured during one loop, filled in as it goes (a Ctrl-C keeps what is there)."""

    opts: LoopOptions
    work: Path
    stages: dict[str, float] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)  # progress rows (the report's plots)
    probe: FreshnessProbe | None = None
    caller: RankCaller | None = None  # the replay's Rank calls
    interrupted: bool = False
    error: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str, number: int):
        log.info("[%d/%d] %s", number, N_STAGES, name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - t0, 1)
