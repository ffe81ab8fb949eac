"""Test-then-train: each micro-batch is scored by every model first, then the candidate trains on it.

No Kafka here (consumer.py feeds it): everything is a method call on decoded examples, so
the order of operations is unit tested. One micro-batch (``Learner.process``):

1. drop duplicates: an event id already trained on (a redelivery upstream or a replay of
   the broker) is counted and skipped; the seen ids are a bounded window kept in the
   durable state;
2. test: score the batch with the serving model, the candidate and the frozen warm start
   (and, while a new version is on probation, its parent), all before any training on
   it (prequential.py); the rows go into the rolling windows the gate reads (gate.py);
3. train: incremental SFT on the batch, NLL of the target's action read at the target's
   anchor, the target placed as a candidate of its history, exactly as Rank scores it
   (samples.py explains why history items are not trained again). AdamW, constant
   learning rate (a near-line run has no end for a schedule to decay to), gradient
   clipping. A non-finite loss skips the step and is counted. The candidate that is
   scored, gated and published is an exponential moving average of the trained weights
   (``stepped``), ``ema`` per optimiser step (0: the trained weights themselves).
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.device import autocast, pick_device, resolve_precision
from models.hmat.checkpoint import load_weights
from models.hmat.model import HMAT
from models.hmat.sequence import TokenStream, TokenType, UserSequence, build_stream
from recipes.ranker.train import TrainConfig, build_optimizer
from trainer.config import TrainerConfig
from trainer.lineage import load_tensors
from trainer.prequential import Window
from trainer.samples import Example

log = logging.getLogger(__name__)

MODELS = ("serving", "candidate", "frozen")
PROBATION_MODELS = ("published", "parent")


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


class Learner:
    """The models of test-then-train and the candidate's optimiser (module docstring).

    ``serving`` is the model Triton serves, ``parent`` the one it replaced while it is on
    probation, ``frozen`` the warm start, ``candidate`` the weights that are gated and
    published, ``stepped`` the weights the optimiser steps (the same model when ``ema`` is
    0). ``profile_of(user_id)`` gives the user's profile tokens: serving's source
    (``serving.profiles.Profiles.tokens``), so that training and serving build one stream.
    """

    def __init__(self, warm: HMAT, profile_of, config: TrainerConfig) -> None:
        self.config = config
        self.profile_of = profile_of
        self.device = pick_device(config.device)
        self.amp_dtype = resolve_precision(config.precision, self.device)  # type: ignore[arg-type]
        self.layout = warm.config.layout
        self.frozen = copy.deepcopy(warm).to(self.device).eval()
        # Serving *is* the frozen warm start until the first publish: one model, scored once
        # (``process``). Nothing changes ``serving`` in place; publishing replaces it.
        self.serving = self.frozen
        self.parent: HMAT | None = None
        self.candidate = copy.deepcopy(warm).to(self.device).eval()
        self.stepped = self.candidate if config.ema == 0 else copy.deepcopy(self.candidate)
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
        self.probe: list[Example] = []

    # --- the optimiser -----------------------------------------------------------------------

    def warm_start_optimizer(self, path: Path) -> bool:
        """Take AdamW's moments from the offline SFT run, keeping this trainer's hyper-parameters.

        A fresh AdamW moves every weight by about ``lr`` on its first steps whatever its
        gradient (the bias-corrected ratio m / sqrt(v) starts near +-1), which knocks a
        converged model off its optimum; the offline run's moments know each weight's
        gradient scale. Only an SFT run's state is taken (PT's moments belong to another loss).
        """
        if not path.is_file():
            return False
        saved = load_tensors(path)  # weights_only: a planted pickle is refused (UnsafeStateError)
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
        self.optimizer = build_optimizer(self.stepped, tc, self.device)
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
        scores = self._test(streams)
        self._record(users, labels, scores)
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

    def _test(self, streams: list[TokenStream]) -> dict[str, np.ndarray]:
        """Every model scores the batch before anything trains on it.

        A model under two names (serving is frozen until the first publish, then frozen is
        the parent on probation) is scored once.
        """
        models = {"frozen": self.frozen, "candidate": self.candidate, "serving": self.serving}
        if self.parent is not None:
            models["parent"] = self.parent
        by_model: dict[int, np.ndarray] = {}
        scores = {}
        for name, model in models.items():
            if id(model) not in by_model:
                by_model[id(model)] = self.score(model, streams)
            scores[name] = by_model[id(model)]
        return scores

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
        self.stepped.train()
        # The binary label is the action index, as in the history (serving.online.history_of).
        target = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        losses, skipped, start, step_seconds = [], 0, 0, []
        for stream in streams:
            t_step = time.perf_counter()
            n = stream.tokens.shape[0]
            y = target[start : start + n]
            start += n
            with autocast(self.device, self.amp_dtype):
                hidden = self.stepped.forward_stream(stream)  # (B, S, C)
            logits = self.stepped.action_logits(_target_hidden(stream, hidden).float())  # (B, A), fp32 head
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                self.counts["non_finite_loss_steps"] += 1
                skipped += 1
                continue
            self._step(loss)
            self.steps += 1
            self._update_ema()
            losses.append(float(loss.detach()))
            step_seconds.append(time.perf_counter() - t_step)
        self.stepped.eval()
        return (float(np.mean(losses)) if losses else math.nan), skipped, step_seconds

    def _step(self, loss: torch.Tensor) -> None:
        """Backward, clip, AdamW step; fp16 through the scaler (module docstring, "Precision")."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.stepped.parameters(), self.config.grad_clip or float("inf"))
        if self.scaler is None:
            self.optimizer.step()
            return
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skipped when the unscaled gradients are not finite
        self.scaler.update()
        if self.scaler.get_scale() < scale:
            self.counts["amp_overflow_steps"] += 1

    @torch.no_grad()
    def _update_ema(self) -> None:
        """candidate <- ema * candidate + (1 - ema) * stepped (parameters; buffers are copied)."""
        if self.stepped is self.candidate:
            return
        mine, theirs = list(self.candidate.parameters()), list(self.stepped.parameters())
        torch._foreach_lerp_(mine, theirs, 1.0 - self.config.ema)
        for b, src in zip(self.candidate.buffers(), self.stepped.buffers(), strict=True):
            b.copy_(src)

    # --- which model serves ------------------------------------------------------------------

    def serve(self, model: HMAT) -> None:
        """``model`` is served now: the old serving model becomes its parent, both scored on probation."""
        self.parent = self.serving
        self.serving = copy.deepcopy(model).to(self.device).eval()
        self.since_publish = 0
        self.probation_window = Window(PROBATION_MODELS, self.config.probation)

    def restore_parent(self) -> None:
        """The served version was withdrawn: its parent serves again, the candidate restarts from it."""
        if self.parent is None:
            raise RuntimeError("no parent to roll back to")
        self.serving = self.parent
        self.reset_candidate(self.serving)
        self.end_probation()

    def adopt(self, model: HMAT) -> None:
        """Serve ``model`` (a version chosen from outside); the candidate restarts from it."""
        self.serving = copy.deepcopy(model).to(self.device).eval()
        self.reset_candidate(self.serving)
        self.end_probation()

    def end_probation(self) -> None:
        self.parent, self.probation_window = None, None

    def reset_candidate(self, model: HMAT) -> None:
        self.candidate.load_state_dict(model.state_dict())
        self.candidate.eval()
        if self.stepped is not self.candidate:
            self.stepped.load_state_dict(model.state_dict())
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
        """(JSON-able state, torch state: optimizer, trained weights, scaler, RNG); the candidate is saved apart."""
        state = {
            "steps": self.steps,
            "trained": self.trained,
            "counts": dict(self.counts),
            "since_publish": self.since_publish,
            "window": self.window.to_dict(),
            "probation_window": self.probation_window.to_dict() if self.probation_window else None,
            "seen": list(self._seen),
        }
        tensors = {
            "optimizer": self.optimizer.state_dict(),
            "learner": self.stepped.state_dict() if self.stepped is not self.candidate else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        return state, tensors

    def load_state(self, snapshot: Path, state: dict, tensors: dict, serving: HMAT | None, parent: HMAT | None) -> None:
        """Restore a snapshot; ``serving`` serves (None: the warm start), ``parent`` is on probation (None: none)."""
        load_weights(self.candidate, snapshot)
        self.candidate.to(self.device).eval()
        if self.stepped is not self.candidate:
            self.stepped.load_state_dict(tensors.get("learner") or self.candidate.state_dict())
        self._new_optimizer()
        self.optimizer.load_state_dict(tensors["optimizer"])
        if self.scaler is not None and tensors.get("scaler") is not None:
            self.scaler.load_state_dict(tensors["scaler"])
        torch.set_rng_state(tensors["torch_rng"])
        if tensors.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tensors["cuda_rng"])
        self.steps, self.trained = state["steps"], state["trained"]
        self.counts = Counter(state["counts"])
        self.since_publish = state["since_publish"]
        self.window = Window.from_dict(state["window"])
        self._seen = deque(state["seen"])
        self._seen_set = set(self._seen)
        if serving is not None:
            self.serving = serving.to(self.device).eval()
        if parent is not None:
            self.parent = parent.to(self.device).eval()
            self.probation_window = Window.from_dict(state["probation_window"])


def _target_hidden(stream: TokenStream, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden state at each row's candidate anchor (one candidate per row): (B, S, C) -> (B, C)."""
    b, s = (stream.token_type == TokenType.CAND_ANCHOR).nonzero(as_tuple=True)
    if b.numel() != stream.tokens.shape[0]:
        raise ValueError("each training stream must hold exactly one candidate (its target)")
    return hidden[b, s]
