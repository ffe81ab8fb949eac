"""The near-line trainer's core: micro-batch in -> prequential scores, SFT step, gate, probation.

No Kafka here (service.py wraps it): everything is a method call on decoded examples, so
the order of operations is unit tested. One micro-batch (``process``):

1. drop duplicates: an event id already trained on (a redelivery upstream or a replay of
   the broker) is counted and skipped; the seen ids are a bounded window kept in the
   durable state;
2. test: score the batch with the serving model, the candidate and the frozen warm start
   (and, while a new version is on probation, its parent), all before any training on
   it (prequential.py); the rows go into the rolling windows;
3. train: incremental SFT on the batch, NLL of the target's action read at the target's
   anchor, the target placed as a candidate of its history, exactly as Rank scores it
   (samples.py explains why history items are not trained again). AdamW, constant
   learning rate (a near-line run has no end for a schedule to decay to), gradient
   clipping. A non-finite loss skips the step and is counted. The candidate that is
   scored, gated and published is an exponential moving average of the trained weights
   (the ``learner``), ``ema`` per optimiser step (0: the trained weights themselves).
   Why: a stream's consecutive events are clustered by user (ML-100K users rate dozens of
   films in one session), so every step follows a handful of users and the raw weights
   wander with them, which costs global AUC; their average keeps the direction the steps
   share. The defaults (lr 3e-4, ema 0.98) were chosen on ML-100K from a warm start
   trained on rows < 50,000, replaying rows 50,000-60,000 (``hisam bench trainer
   --direct``): without the average, lr 3e-4 lost 0.006 AUC to the frozen model and
   1e-4 / 3e-5 gained nothing measurable; with it, lr 3e-4 gained 0.0023. The period
   the benchmark reports (a warm start at 60%, replaying the rest) was not looked at.

Precision (``precision``, recipes/ranker/train.py's rules): ``auto`` is fp32 on CPU and mixed
precision on CUDA (bf16 where supported, else fp16); ``bf16``/``fp16`` force it (CPU autocast
runs both, which is how the tests cover the GPU path). The trunk runs under
``torch.autocast``; the action head runs in fp32 on the fp32 hidden state, for the loss and
for the prequential scores alike: a bf16 logit has 8 mantissa bits, so bf16 probabilities
would fall on a grid of a few hundred values and tie, which biases AUC and the gate. fp16
scales the loss with a ``GradScaler`` (gradients unscaled before clipping; a step skipped
for an overflow is counted as ``amp_overflow_steps``). Weights and AdamW state stay fp32.

Gate (``gate``): with at least ``min_samples`` prequential rows since the last publish, the
candidate and the serving model are compared on the last of them (up to ``gate_window``),
on the same events: a paired test of D = AUC(candidate) - AUC(serving) (paired.py: a
user-level bootstrap by default, or DeLong). It passes when D's lower bound at
``confidence`` is at least ``-margin`` (not worse beyond noise by more than the margin) and
D itself is at least ``min_improvement``; the weights must be finite. With the defaults
(margin 0, confidence 0.9) a candidate is published only when it is better than the
serving model with 90% one-sided confidence. The decision records both AUCs, D, its
standard error and bounds, and the same test against the frozen warm start. The publisher
adds the export checks (ONNX parity on real probe streams). Probation
(``probation_verdict``): after a publish, the new version and its parent are both scored
for ``probation`` samples; it is rolled back (and the candidate restarts from the parent's
weights) when it is worse beyond noise (the upper bound of AUC(published) - AUC(parent)
below 0) by more than ``rollback_margin`` (D < -rollback_margin).

Determinism: given the same state and the same batches, the same weights come out (CPU;
the RNG state is part of the snapshot), which is what makes resume exact.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.device import autocast, pick_device, resolve_precision
from models.hmat.checkpoint import STATE_FILE, load_checkpoint, load_weights, save_checkpoint
from models.hmat.model import HMAT
from models.hmat.sequence import TokenStream, TokenType, UserSequence, build_stream
from recipes.ranker.train import TrainConfig, build_optimizer
from trainer.paired import METHODS, UNITS, PairedTest, paired_test
from trainer.prequential import Window, metrics_of
from trainer.samples import Example

log = logging.getLogger(__name__)

MODELS = ("serving", "candidate", "frozen")


@dataclass
class TrainerConfig:
    """Near-line SFT and gate settings (module docstring)."""

    lr: float = 3e-4  # chosen with ema on an earlier replay than the reported one (module docstring)
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
class GateDecision:
    passed: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchReport:
    """What one micro-batch did; ``scores`` are the prequential scores (model -> (R,)) of the new rows."""

    received: int
    trained: int
    duplicates: int
    skipped_steps: int
    loss: float
    seconds: float
    users: np.ndarray
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    step_seconds: tuple[float, ...] = ()  # each optimiser step's time (the service's step-latency metric)


def weights_finite(model: HMAT) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class NearlineTrainer:
    """Serving, candidate and frozen models plus the rolling evaluation (module docstring).

    ``profile_of(user_id)`` gives the user's profile tokens: serving's source
    (``serving.profiles.Profiles.tokens``), so that training and serving build one stream.
    """

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
        self.profile_of = profile_of
        self.tokenizer_version = tokenizer_version
        self.meta = dict(meta or {})  # carried into every checkpoint (profile vocabulary, variant, ...)
        self.device = pick_device(config.device)
        self.amp_dtype = resolve_precision(config.precision, self.device)  # type: ignore[arg-type]
        self.layout = warm.config.layout
        self.frozen = copy.deepcopy(warm).to(self.device).eval()
        # Serving *is* the frozen warm start until the first publish: one model, scored once
        # (``process``). Nothing changes ``serving`` in place; publishing replaces it.
        self.serving = self.frozen
        self.candidate = copy.deepcopy(warm).to(self.device).eval()
        # The weights the optimiser steps; with ``ema`` the candidate is their moving average.
        self.learner = self.candidate if config.ema == 0 else copy.deepcopy(self.candidate)
        self.parent: HMAT | None = None
        self.serving_version: int | None = None
        self.parent_version: int | None = None
        self.version_content: dict[int, str] = {}  # Triton version -> content version (hmat-<hash>)
        self._new_optimizer()
        torch.manual_seed(config.seed)
        self.window = Window(MODELS, config.window)
        self.probation_window: Window | None = None
        self.since_publish = 0
        self.steps = 0
        self.trained = 0
        self.counts: Counter[str] = Counter()
        self._seen: deque[str] = deque()
        self._seen_set: set[str] = set()
        self.offsets: dict[str, int] = {}
        self.probe: list[Example] = []

    # --- setup -------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, profile_of, config: TrainerConfig) -> NearlineTrainer:
        """Warm start from a ranker checkpoint (the serving one); its tokenizer version is enforced."""
        model, ckpt = load_checkpoint(checkpoint)
        meta = {k: v for k, v in ckpt.items() if k not in ("format", "model", "tokenizer_version")}
        trainer = cls(model, profile_of, config, tokenizer_version=ckpt.get("tokenizer_version") or "", meta=meta)
        trainer.warm_start_optimizer(Path(checkpoint) / STATE_FILE)
        return trainer

    def warm_start_optimizer(self, path: Path) -> bool:
        """Take AdamW's moments from the offline SFT run, keeping this trainer's hyper-parameters.

        A fresh AdamW moves every weight by about ``lr`` on its first steps whatever its
        gradient (the bias-corrected ratio m / sqrt(v) starts near +-1), which knocks a
        converged model off its optimum; the offline run's moments know each weight's
        gradient scale. Only an SFT run's state is taken (PT's moments belong to another loss).
        """
        if not path.is_file():
            return False
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("stage") != "sft":
            return False
        opt = saved["optimizer"]
        if len(opt["param_groups"]) != len(self.optimizer.param_groups):
            return False
        for mine, theirs in zip(self.optimizer.param_groups, opt["param_groups"], strict=True):
            theirs.update({k: v for k, v in mine.items() if k != "params"})
        try:
            self.optimizer.load_state_dict(opt)
        except (ValueError, KeyError) as e:
            log.warning("offline optimizer state in %s does not fit: fresh AdamW (%s)", path, e)
            self._new_optimizer()
            return False
        log.info("AdamW moments warm-started from %s", path)
        return True

    def _new_optimizer(self) -> None:
        tc = TrainConfig(
            stage="sft", lr=self.config.lr, weight_decay=self.config.weight_decay, grad_clip=self.config.grad_clip
        )
        self.optimizer = build_optimizer(self.learner, tc, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

    # --- one micro-batch ---------------------------------------------------------------------

    def sequences(self, examples: Sequence[Example]) -> list[UserSequence]:
        return [ex.sequence(self.profile_of(ex.user_id), self.layout.max_items) for ex in examples]

    def _streams(self, seqs: list[UserSequence]) -> list[TokenStream]:
        bs = self.config.batch_size
        return [build_stream(seqs[i : i + bs], self.layout).to(self.device) for i in range(0, len(seqs), bs)]

    @torch.no_grad()
    def score(self, model: HMAT, streams: list[TokenStream]) -> np.ndarray:
        """P(positive) of each stream's single candidate, (R,) float64 (NaN stays NaN)."""
        model.eval()
        out = []
        for stream in streams:
            with autocast(self.device, self.amp_dtype):
                hidden = model.forward_stream(stream)  # (B, S, C)
            # The head in fp32 (module docstring: bf16 probabilities would tie).
            out.append(model.positive_prob(_target_hidden(stream, hidden).float()).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def _dedup(self, examples: Sequence[Example]) -> list[Example]:
        fresh, batch_ids = [], set()
        for ex in examples:
            if ex.event_id in self._seen_set or ex.event_id in batch_ids:
                self.counts["duplicates"] += 1
                continue
            batch_ids.add(ex.event_id)
            fresh.append(ex)
        return fresh

    def _remember(self, examples: Sequence[Example]) -> None:
        for ex in examples:
            self._seen.append(ex.event_id)
            self._seen_set.add(ex.event_id)
        while len(self._seen) > self.config.dedup_window:
            self._seen_set.discard(self._seen.popleft())

    def process(self, examples: Sequence[Example]) -> BatchReport:
        """Dedup, score (test), then train on one micro-batch (module docstring)."""
        t0 = time.perf_counter()
        fresh = self._dedup(examples)
        users = np.asarray([ex.user_id for ex in fresh], dtype=np.int64)
        labels = np.asarray([ex.label for ex in fresh], dtype=np.int64)
        if not fresh:
            return BatchReport(len(examples), 0, len(examples), 0, math.nan, 0.0, users, labels, {})
        streams = self._streams(self.sequences(fresh))
        # 1. Test: every model scores the batch before anything trains on it.
        # A model under two names (serving is frozen until the first publish, then frozen
        # is the parent on probation) is scored once.
        models = {"frozen": self.frozen, "candidate": self.candidate, "serving": self.serving}
        if self.parent is not None:
            models["parent"] = self.parent
        by_model: dict[int, np.ndarray] = {}
        scores = {}
        for name, model in models.items():
            if id(model) not in by_model:
                by_model[id(model)] = self.score(model, streams)
            scores[name] = by_model[id(model)]
        self._record(users, labels, scores)
        # 2. Train.
        loss, skipped, step_seconds = self._train(streams, labels)
        self._remember(fresh)
        self.trained += len(fresh)
        self.probe = list(fresh[-8:])
        dup = len(examples) - len(fresh)
        return BatchReport(
            len(examples),
            len(fresh),
            dup,
            skipped,
            loss,
            time.perf_counter() - t0,
            users,
            labels,
            scores,
            tuple(step_seconds),
        )

    def _record(self, users: np.ndarray, labels: np.ndarray, scores: dict[str, np.ndarray]) -> None:
        finite = {m: np.isfinite(s) for m, s in scores.items()}
        for m, ok in finite.items():
            if not ok.all():
                self.counts[f"non_finite_scores_{m}"] += int((~ok).sum())
        # A NaN score is a model failure, not data: it is kept as the worst possible score
        # (0.0 for a positive ranks below everything) so the window still judges the model.
        safe = {m: np.where(ok, scores[m], -1.0) for m, ok in finite.items()}
        self.window.add(users, labels, safe)
        self.since_publish += len(users)
        if self.probation_window is not None:
            self.probation_window.add(users, labels, {"published": safe["serving"], "parent": safe["parent"]})

    def _train(self, streams: list[TokenStream], labels: np.ndarray) -> tuple[float, int, list[float]]:
        self.learner.train()
        # The binary label is the action index, as in the history (serving.online.history_of).
        target = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        losses, skipped, start, step_seconds = [], 0, 0, []
        for stream in streams:
            t_step = time.perf_counter()
            n = stream.tokens.shape[0]
            y = target[start : start + n]
            start += n
            with autocast(self.device, self.amp_dtype):
                hidden = self.learner.forward_stream(stream)  # (B, S, C)
            logits = self.learner.action_logits(_target_hidden(stream, hidden).float())  # (B, A), fp32 head
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                self.counts["non_finite_loss_steps"] += 1
                skipped += 1
                continue
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.learner.parameters(), self.config.grad_clip or float("inf"))
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skipped when the unscaled gradients are not finite
                self.scaler.update()
                if self.scaler.get_scale() < scale:
                    self.counts["amp_overflow_steps"] += 1
            else:
                self.optimizer.step()
            self.steps += 1
            self._update_ema()
            losses.append(float(loss.detach()))
            step_seconds.append(time.perf_counter() - t_step)
        self.learner.eval()
        return (float(np.mean(losses)) if losses else math.nan), skipped, step_seconds

    @torch.no_grad()
    def _update_ema(self) -> None:
        """candidate <- ema * candidate + (1 - ema) * learner (parameters; buffers are copied)."""
        if self.learner is self.candidate:
            return
        mine, theirs = list(self.candidate.parameters()), list(self.learner.parameters())
        torch._foreach_lerp_(mine, theirs, 1.0 - self.config.ema)
        for b, src in zip(self.candidate.buffers(), self.learner.buffers(), strict=True):
            b.copy_(src)

    # --- gate, publish bookkeeping, probation ------------------------------------------------

    def metrics(self, last: int | None = None) -> dict[str, dict[str, float]]:
        return self.window.metrics(last)

    def paired(self, users: np.ndarray, labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> PairedTest:
        """AUC(a) - AUC(b) on the same rows, by the configured test (paired.py); deterministic."""
        cfg = self.config
        return paired_test(
            labels,
            a,
            b,
            users,
            method=cfg.gate_method,  # type: ignore[arg-type]
            unit=cfg.gate_unit,  # type: ignore[arg-type]
            confidence=cfg.confidence,
            resamples=cfg.resamples,
            seed=cfg.seed,
        )

    def gate(self) -> GateDecision:
        """Whether the candidate may be published now (module docstring); the export checks come after."""
        cfg = self.config
        if self.since_publish < cfg.min_samples:
            return GateDecision(False, "not_enough_samples", {"since_publish": self.since_publish})
        last = min(self.since_publish, cfg.gate_window, len(self.window))
        users, labels, scores = self.window.arrays(last)
        info: dict[str, Any] = {
            "rows": last,
            "since_publish": self.since_publish,
            **{m: metrics_of(users, labels, s) for m, s in scores.items()},
        }
        if not weights_finite(self.candidate):
            return GateDecision(False, "non_finite_weights", info)
        t0 = time.perf_counter()
        test = self.paired(users, labels, scores["candidate"], scores["serving"])
        info["paired"] = test.to_dict()
        info["vs_frozen"] = (
            info["paired"]  # the same test until the first publish
            if self.serving is self.frozen
            else self.paired(users, labels, scores["candidate"], scores["frozen"]).to_dict()
        )
        info["stats_s"] = time.perf_counter() - t0  # both tests: the gate's cost per micro-batch
        info["rule"] = {"margin": cfg.margin, "min_improvement": cfg.min_improvement, "confidence": cfg.confidence}
        if math.isnan(test.diff) or math.isnan(test.lower):
            return GateDecision(False, "undefined_auc", info)
        if test.lower < -cfg.margin:
            return GateDecision(False, "below_serving", info)
        if test.diff < cfg.min_improvement:
            return GateDecision(False, "insufficient_improvement", info)
        return GateDecision(True, "passed", info)

    def on_published(self, version: int, model: HMAT | None = None) -> None:
        """``model`` (default: the candidate now) is served as ``version``: it becomes the serving model; the old one its parent.

        A publish that completes in the background passes the weights it published: the
        candidate has trained on since.
        """
        self.parent, self.parent_version = self.serving, self.serving_version
        self.serving = copy.deepcopy(self.candidate if model is None else model).to(self.device).eval()
        self.serving_version = version
        self.since_publish = 0
        self.probation_window = Window(("published", "parent"), self.config.probation) if self.parent else None

    def probation_verdict(self) -> GateDecision | None:
        """None while on probation (or none running); else keep (passed) or roll back (not passed)."""
        w = self.probation_window
        if w is None or len(w) < self.config.probation:
            return None
        users, labels, scores = w.arrays()
        m: dict[str, Any] = {k: metrics_of(users, labels, s) for k, s in scores.items()}
        test = self.paired(users, labels, scores["published"], scores["parent"])
        m["paired"] = test.to_dict()
        if not math.isnan(test.diff) and test.upper < 0 and test.diff < -self.config.rollback_margin:
            return GateDecision(False, "underperforms_parent", m)
        return GateDecision(True, "kept", m)

    def end_probation(self) -> None:
        self.parent, self.parent_version, self.probation_window = None, None, None

    def on_rolled_back(self) -> None:
        """The served version was withdrawn: its parent serves again, the candidate restarts from it."""
        if self.parent is None:
            raise RuntimeError("no parent to roll back to")
        self.serving, self.serving_version = self.parent, self.parent_version
        self.reset_candidate(self.serving)
        self.end_probation()

    def adopt_serving(self, model: HMAT, version: int) -> None:
        """Serve ``model`` as ``version`` (an external rollback); the candidate restarts from it."""
        self.serving, self.serving_version = copy.deepcopy(model).to(self.device).eval(), version
        self.reset_candidate(self.serving)
        self.end_probation()

    def reset_candidate(self, model: HMAT) -> None:
        self.candidate.load_state_dict(model.state_dict())
        self.candidate.eval()
        if self.learner is not self.candidate:
            self.learner.load_state_dict(model.state_dict())
        self._new_optimizer()
        self.since_publish = 0
        self.counts["candidate_resets"] += 1

    def probe_sequences(self, n_candidates: int = 4) -> list[UserSequence]:
        """Real streams for the export parity check: recent users, each with recent targets as candidates."""
        if not self.probe:
            return []
        cands = np.stack([ex.target_codes for ex in self.probe[-n_candidates:]])
        cands = np.concatenate([cands] * math.ceil(n_candidates / len(cands)))[:n_candidates]  # (N, k)
        seqs = []
        for ex in self.probe[:4]:
            s = ex.sequence(self.profile_of(ex.user_id), self.layout.max_items)
            seqs.append(dataclasses.replace(s, candidates=torch.from_numpy(cands)))
        return seqs

    # --- durable state -----------------------------------------------------------------------

    def state_dict(self) -> tuple[dict, dict]:
        """(JSON-able state, torch state: optimizer, scaler, RNG)."""
        state = {
            "steps": self.steps,
            "trained": self.trained,
            "counts": dict(self.counts),
            "offsets": dict(self.offsets),
            "since_publish": self.since_publish,
            "serving_version": self.serving_version,
            "parent_version": self.parent_version,
            "version_content": {str(k): v for k, v in self.version_content.items()},
            "window": self.window.to_dict(),
            "probation_window": self.probation_window.to_dict() if self.probation_window else None,
            "seen": list(self._seen),
            "tokenizer_version": self.tokenizer_version,
            "config": dataclasses.asdict(self.config),
        }
        tensors = {
            "optimizer": self.optimizer.state_dict(),
            "learner": self.learner.state_dict() if self.learner is not self.candidate else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        return state, tensors

    def save_candidate(self, directory: Path) -> None:
        save_checkpoint(directory, self.candidate, tokenizer_version=self.tokenizer_version, meta=self.meta)

    def load_state(self, snapshot: Path, state: dict, tensors: dict, version_model) -> None:
        """Restore a snapshot; ``version_model(n)`` loads the weights of published version ``n``."""
        if state["tokenizer_version"] != self.tokenizer_version:
            raise ValueError(
                f"the state in {snapshot} is for tokenizer {state['tokenizer_version']!r}, "
                f"the warm start for {self.tokenizer_version!r}: start a new state directory after re-tokenising"
            )
        load_weights(self.candidate, snapshot)
        self.candidate.to(self.device).eval()
        if self.learner is not self.candidate:
            self.learner.load_state_dict(tensors.get("learner") or self.candidate.state_dict())
        self._new_optimizer()
        self.optimizer.load_state_dict(tensors["optimizer"])
        if self.scaler is not None and tensors.get("scaler") is not None:
            self.scaler.load_state_dict(tensors["scaler"])
        torch.set_rng_state(tensors["torch_rng"])
        if tensors.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tensors["cuda_rng"])
        self.steps, self.trained = state["steps"], state["trained"]
        self.counts = Counter(state["counts"])
        self.offsets = dict(state["offsets"])
        self.since_publish = state["since_publish"]
        self.window = Window.from_dict(state["window"])
        self._seen = deque(state["seen"])
        self._seen_set = set(self._seen)
        self.version_content = {int(k): v for k, v in state["version_content"].items()}
        self.serving_version = state["serving_version"]
        if self.serving_version is not None:
            self.serving = version_model(self.serving_version).to(self.device).eval()
        self.parent_version = state["parent_version"]
        pw = state.get("probation_window")
        if self.parent_version is not None and pw is not None:
            self.parent = version_model(self.parent_version).to(self.device).eval()
            self.probation_window = Window.from_dict(pw)


def _target_hidden(stream: TokenStream, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden state at each row's candidate anchor (one candidate per row): (B, S, C) -> (B, C)."""
    b, s = (stream.token_type == TokenType.CAND_ANCHOR).nonzero(as_tuple=True)
    if b.numel() != stream.tokens.shape[0]:
        raise ValueError("each training stream must hold exactly one candidate (its target)")
    return hidden[b, s]


def summary(metrics: dict[str, Any]) -> str:
    """The per-model AUC / GAUC entries of ``metrics`` in one line (other entries are skipped)."""
    return ", ".join(
        f"{m} AUC {v['auc']:.4f} GAUC {v['gauc']:.4f}"
        for m, v in metrics.items()
        if isinstance(v, dict) and "auc" in v and "gauc" in v
    )


def paired_summary(test: dict[str, Any]) -> str:
    """One line of a PairedTest dict: D, its standard error and bounds."""
    return (
        f"D={test['diff']:+.4f} (se {test['se']:.4f}, bounds [{test['lower']:+.4f}, {test['upper']:+.4f}] at "
        f"{test['confidence']:.2f}, {test['method']}/{test['unit']}, {test['n']} events, {test['users']} users)"
    )


def metrics_of_report(report: BatchReport) -> dict[str, dict[str, float]]:
    return {m: metrics_of(report.users, report.labels, s) for m, s in report.scores.items()}
