"""The trainer's settings, flat, as ``hisam trainer run``'s options name them.

``TrainerConfig`` is read by the learner (learner.py: the SFT step, the moving average,
precision) and the gate (gate.py: the paired test, probation); ``ServiceConfig`` by the
consumer (consumer.py), the publisher (publisher.py) and the loop around them (service.py).
Each field's comment says what it sets; the modules say why the defaults are what they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infra.triton_access import TritonAccess
from stream import topics as tp
from trainer.faults import Faults
from trainer.paired import METHODS, UNITS


@dataclass
class TrainerConfig:
    """Near-line SFT and gate settings (learner.py, gate.py)."""

    lr: float = 3e-4  # chosen with ema on an earlier replay than the reported one (learner.py)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 64  # examples per optimiser step; a micro-batch is cut into such chunks
    window: int = 4000  # rolling prequential window (rows)
    min_samples: int = 1000  # prequential rows since the last publish before the gate opens
    gate_window: int = 2000  # the gate compares AUC over at most this many of the latest rows
    margin: float = 0.0  # pass when the lower bound of AUC(candidate) - AUC(serving) >= -margin
    min_improvement: float = 0.0  # ... and AUC(candidate) - AUC(serving) >= min_improvement
    confidence: float = 0.9  # one-sided confidence of the bounds (gate and probation)
    gate_method: str = "bootstrap"  # paired.py: "bootstrap" or "delong"
    gate_unit: str = "user"  # the bootstrap resamples users (clustered events) or events
    resamples: int = 1000  # bootstrap resamples per decision
    probation: int = 1000  # rows after a publish before it is judged against its parent
    rollback_margin: float = 0.01  # roll back when worse beyond noise and by more than this
    ema: float = 0.98  # candidate = EMA of the trained weights, this decay per step (0: the weights themselves)
    dedup_window: int = 200_000  # event ids remembered for duplicate detection
    keep_versions: int = 5
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_samples < 1 or self.window < self.min_samples:
            raise ValueError(f"need 1 <= min_samples ({self.min_samples}) <= window ({self.window})")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.batch_size < 1 or self.probation < 1 or self.resamples < 1:
            raise ValueError("batch_size, probation and resamples must be positive")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.gate_method not in METHODS or self.gate_unit not in UNITS:
            raise ValueError(f"gate_method must be one of {METHODS} and gate_unit one of {UNITS}")


@dataclass
class ServiceConfig:
    """Where the service reads, where it publishes, and when it stops (consumer.py, publisher.py, service.py)."""

    bootstrap: str
    state_dir: Path
    repo: Path
    topic: str = tp.TRAINING_SAMPLES
    dead_letter_topic: str = tp.DEAD_LETTERS
    tombstone_topic: str | None = tp.USER_TOMBSTONES  # deleted users' samples skipped (trainer/deletions.py)
    group_id: str = "hisam-trainer"
    max_records: int = 256  # micro-batch size
    max_wait_s: float = 2.0  # a micro-batch closes this long after its first record
    triton_url: str | None = None  # confirm that Triton serves each published version
    triton_access: TritonAccess = field(default_factory=TritonAccess)  # its key and TLS (infra/triton_access.py)
    publish_timeout_s: float = 120.0
    lock_timeout_s: float = 60.0  # waiting for the repository's writer lock (a rollback from outside)
    template_dir: Path | None = None  # traced ONNX templates (default: <state_dir>/onnx_templates)
    full_export: bool = False  # trace every candidate instead of re-weighting the template
    target: str = "cpu"
    instances: int = 1
    threads: int = 1
    idle_exit_s: float | None = None  # stop after this long without records (tests, benchmarks)
    max_samples: int | None = None  # stop after this many samples (tests, benchmarks)
    background_publish: bool = True  # wait for Triton off the loop (publisher.py)
    faults: Faults = field(default_factory=Faults)  # none armed unless a test asks (faults.py)
