"""The Kafka-free near-line trainer: a learner, the gate over its windows, and the versions it serves.

``NearlineTrainer`` ties the learner (learner.py: test-then-train) to the gate and probation
(gate.py) and keeps what they share with the repository: the Triton version the serving
model is, its parent while on probation, each version's content hash, and the offsets
consumed. ``state_dict`` / ``load_state`` are its durable state (lineage.py writes them).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from models.hmat.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
from models.hmat.model import HMAT
from trainer.config import TrainerConfig
from trainer.gate import GateDecision, gate_decision, probation_verdict
from trainer.learner import BatchReport, Learner
from trainer.samples import Example


class NearlineTrainer:
    """The learner, the gate and the serving version's bookkeeping (module docstring)."""

    def __init__(
        self,
        warm: HMAT,
        profile_of,
        config: TrainerConfig,
        *,
        tokenizer_version: str,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.tokenizer_version = tokenizer_version
        self.meta = dict(meta or {})  # carried into every checkpoint (profile vocabulary, variant, ...)
        self.learner = Learner(warm, profile_of, config)
        self.serving_version: int | None = None
        self.parent_version: int | None = None
        self.version_content: dict[int, str] = {}  # Triton version -> content version (hmat-<hash>)
        self.offsets: dict[str, int] = {}  # "topic:partition" -> next offset to consume

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, profile_of, config: TrainerConfig) -> NearlineTrainer:
        """Warm start from a ranker checkpoint (the serving one); its tokenizer version is enforced."""
        model, ckpt = load_checkpoint(checkpoint)
        meta = {k: v for k, v in ckpt.items() if k not in ("format", "model", "tokenizer_version")}
        trainer = cls(model, profile_of, config, tokenizer_version=ckpt.get("tokenizer_version") or "", meta=meta)
        trainer.learner.warm_start_optimizer(Path(checkpoint) / STATE_FILE)
        return trainer

    # What the service, its logs and the benchmark report: the learner's.

    @property
    def counts(self) -> Counter[str]:
        return self.learner.counts

    @property
    def trained(self) -> int:
        return self.learner.trained

    @property
    def device(self) -> torch.device:
        return self.learner.device

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.learner.amp_dtype

    # --- micro-batches and decisions ---------------------------------------------------------

    def process(self, examples: Sequence[Example]) -> BatchReport:
        return self.learner.process(examples)

    def gate(self) -> GateDecision:
        lr = self.learner
        return gate_decision(lr.window, lr.since_publish, lr.candidate, lr.serving is lr.frozen, self.config)

    def probation_verdict(self) -> GateDecision | None:
        return probation_verdict(self.learner.probation_window, self.config)

    # --- which version serves ----------------------------------------------------------------

    def on_published(self, version: int, model: HMAT | None = None) -> None:
        """``model`` (default: the candidate now) is served as ``version``; the old one is its parent.

        A publish that completes in the background passes the weights it published: the
        candidate has trained on since.
        """
        self.learner.serve(self.learner.candidate if model is None else model)
        self.parent_version, self.serving_version = self.serving_version, version

    def end_probation(self) -> None:
        self.learner.end_probation()
        self.parent_version = None

    def on_rolled_back(self) -> None:
        """The served version was withdrawn: its parent serves again, the candidate restarts from it."""
        self.learner.restore_parent()
        self.serving_version, self.parent_version = self.parent_version, None

    def adopt_serving(self, model: HMAT, version: int) -> None:
        """Serve ``model`` as ``version`` (an external rollback); the candidate restarts from it."""
        self.learner.adopt(model)
        self.serving_version, self.parent_version = version, None

    # --- durable state -----------------------------------------------------------------------

    def state_dict(self) -> tuple[dict, dict]:
        """(JSON-able state, torch state: optimizer, scaler, RNG)."""
        state, tensors = self.learner.state_dict()
        state |= {
            "offsets": dict(self.offsets),
            "serving_version": self.serving_version,
            "parent_version": self.parent_version,
            "version_content": {str(k): v for k, v in self.version_content.items()},
            "tokenizer_version": self.tokenizer_version,
            "config": dataclasses.asdict(self.config),
        }
        return state, tensors

    def save_candidate(self, directory: Path) -> None:
        save_checkpoint(directory, self.learner.candidate, tokenizer_version=self.tokenizer_version, meta=self.meta)

    def load_state(self, snapshot: Path, state: dict, tensors: dict, version_model: Callable[[int], HMAT]) -> None:
        """Restore a snapshot; ``version_model(n)`` loads the weights of published version ``n``."""
        if state["tokenizer_version"] != self.tokenizer_version:
            raise ValueError(
                f"the state in {snapshot} is for tokenizer {state['tokenizer_version']!r}, "
                f"the warm start for {self.tokenizer_version!r}: start a new state directory after re-tokenising"
            )
        self.offsets = dict(state["offsets"])
        self.version_content = {int(k): v for k, v in state["version_content"].items()}
        self.serving_version = state["serving_version"]
        self.parent_version = state["parent_version"]
        on_probation = self.parent_version is not None and state.get("probation_window") is not None
        self.learner.load_state(
            snapshot,
            state,
            tensors,
            serving=version_model(self.serving_version) if self.serving_version is not None else None,
            parent=version_model(self.parent_version) if on_probation else None,
        )
