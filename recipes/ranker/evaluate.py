"""Evaluating a ranker: one-pass scoring and the metrics of Hi-SAM Table 2 (docs/method.md §5).

Letters: R scored rows (test interactions), B streams in a batch, N candidates per stream.

Metrics (all on probabilities of a positive action, labels 1 = rating > 3):
- AUC: P(a random positive outscores a random negative), ties counting one half: the
  Mann-Whitney U statistic from average ranks, exact and O(R log R).
- GAUC: per-user AUC averaged with weights = the user's number of scored rows
  ("impressions"); users whose rows are all one class have no AUC and are skipped.
- Cold-user AUC / GAUC: the same over rows of users with fewer than 10 training
  interactions (``Dataset.cold_users``).
- Cold-item AUC: AUC over rows whose item has no training interaction
  (``Dataset.cold_items``): the cold-start case semantic IDs exist for. Not a GAUC: a user
  rarely meets more than one cold item.
A metric with no defined value (one class only, or no rows) is NaN, never a made-up 0.5.

Scoring runs ``rank_candidates`` (one-pass parallel ranking, docs/method.md §4) over streams
sorted by length and packed up to a token budget, so padding stays small although
histories range from a few to a few thousand tokens.

Timelines (the "stream" protocol, recipes/ranker/sequences.py): a user's history followed by
test events, event k scored against the history plus events 0..k-1 (the last
``max_items`` of them), then appended with its observed action. ``timeline_examples``
states that definition as one stream per event, scored by ``score_examples``; it costs
O(events x history) tokens. ``score_timelines`` computes the same scores with the anchor
KV cache (docs/method.md §4): encode each history once, then per event score one candidate
block and append one item, so an event costs O(k + 2) new tokens against O(T) cached
slots. It is exact (the cache is lossless) as long as the window has not started to
slide; once history + earlier events pass ``max_items`` the window drops an item per
event, every kept item's state changes, and those events fall back to full streams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from tqdm.auto import tqdm

from models.device import Precision, autocast, resolve_precision
from models.hmat.inference import AnchorKVCache, append_history, encode_history, rank_candidates, score_with_cache
from models.hmat.model import HMAT
from models.hmat.sequence import TokenStream, UserSequence, build_stream

METRICS: tuple[str, ...] = ("auc", "gauc", "cold_user_auc", "cold_user_gauc", "cold_item_auc")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])  # 0-based first rank of each distinct value
    return (start + (counts + 1) / 2.0)[inverse]


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels``; NaN when either class is absent."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = average_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def gauc(
    users: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> float:
    """Impression-weighted mean of per-user AUC over users with both classes; NaN if none has."""
    u = np.asarray(users).ravel()
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not (u.shape == y.shape == s.shape):
        raise ValueError(f"users {u.shape}, labels {y.shape} and scores {s.shape} differ in shape")
    order = np.argsort(u, kind="stable")
    u, y, s = u[order], y[order], s[order]
    bounds = np.flatnonzero(u[1:] != u[:-1]) + 1  # works for any id type, not just numbers
    total, weight = 0.0, 0
    for yy, ss in zip(np.split(y, bounds), np.split(s, bounds), strict=True):
        if yy.size == 0:
            continue
        a = auc(yy, ss)
        if not math.isnan(a):
            total += a * yy.size
            weight += yy.size
    return total / weight if weight else float("nan")


def ranking_metrics(
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    cold_users: np.ndarray,
    cold_items: np.ndarray,
) -> dict[str, float]:
    """The Table 2 metrics (module docstring) plus the row counts behind them."""
    cu = np.isin(user_idx, cold_users)
    ci = np.isin(item_idx, cold_items)
    return {
        "auc": auc(labels, scores),
        "gauc": gauc(user_idx, labels, scores),
        "cold_user_auc": auc(labels[cu], scores[cu]),
        "cold_user_gauc": gauc(user_idx[cu], labels[cu], scores[cu]),
        "cold_item_auc": auc(labels[ci], scores[ci]),
        "rows": len(labels),
        "cold_user_rows": int(cu.sum()),
        "cold_item_rows": int(ci.sum()),
    }


def _stream_length(u: UserSequence, item_len: int) -> int:
    """Tokens of an example's stream (profile, history items, candidate blocks)."""
    return len(u.profile) + len(u.sids) * item_len + len(u.candidates) * (item_len - 1)


def pack_batches(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Example indices, longest first, in batches whose padded size B * S_max stays within ``max_tokens``.

    A single example longer than the budget still forms its own batch. Deterministic:
    ties in length keep input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_batch and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def score_examples(
    model: HMAT,
    examples: Sequence[UserSequence],
    *,
    max_tokens: int = 32768,
    max_batch: int = 256,
    precision: Precision = "auto",
    progress: bool = True,
) -> np.ndarray:
    """P(positive) for every candidate, flattened in example order then candidate order, (R,)."""
    model.eval()
    device = next(model.parameters()).device
    amp_dtype = resolve_precision(precision, device)
    layout = model.config.layout
    counts = [len(u.candidates) for u in examples]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out = np.full(int(starts[-1]), np.nan, dtype=np.float64)
    batches = pack_batches([_stream_length(u, layout.item_len) for u in examples], max_tokens, max_batch)
    for batch in tqdm(batches, desc="score", disable=not progress, unit="batch"):
        stream = build_stream([examples[i] for i in batch], layout).to(device)
        with autocast(device, amp_dtype):
            scores = rank_candidates(model, stream).float().cpu().numpy()  # (B, N), NaN past each count
        for row, i in enumerate(batch):
            out[starts[i] : starts[i + 1]] = scores[row, : counts[i]]
    return out


# --- Timelines: the stream protocol, by definition and with the anchor KV cache -------------


@dataclass
class Timeline:
    """A user's history (T0 items, oldest first, any length) and E test events scored in order.

    ``sids`` (T0, k), ``actions`` (T0,); ``event_sids`` (E, k), ``event_actions`` (E,): the
    observed action of event k joins the history after event k is scored.
    """

    profile: Sequence[int]
    sids: torch.Tensor
    actions: torch.Tensor
    event_sids: torch.Tensor
    event_actions: torch.Tensor


def timeline_examples(
    timelines: Sequence[Timeline], max_items: int, skip: Sequence[int] | None = None
) -> list[UserSequence]:
    """The definition: one stream per event, history = the last ``max_items`` items before it.

    ``skip[i]``: leave out the first ``skip[i]`` events of timeline i (scored elsewhere).
    """
    out = []
    for i, tl in enumerate(timelines):
        sids = torch.cat([tl.sids, tl.event_sids])  # (T0 + E, k)
        actions = torch.cat([tl.actions, tl.event_actions])  # (T0 + E,)
        t0 = len(tl.sids)
        for k in range(0 if skip is None else skip[i], len(tl.event_sids)):
            start, end = max(0, t0 + k - max_items), t0 + k
            out.append(UserSequence(tl.profile, sids[start:end], actions[start:end], tl.event_sids[k : k + 1]))
    return out


def _cacheable(t0: int, n_events: int, max_items: int) -> int:
    """Leading events scorable from the cache: event k needs its exact window, T0 + k <= T (k = 0 always)."""
    return min(n_events, max(1, max_items - t0 + 1)) if n_events else 0


def _select(cache: AnchorKVCache, index: torch.Tensor) -> AnchorKVCache:
    """The cache rows ``index`` (B',) of a batch cache."""
    slots = TokenStream(**{f.name: getattr(cache.slots, f.name)[index] for f in fields(TokenStream)})
    return AnchorKVCache(
        keys=[k[index] for k in cache.keys],
        values=[v[index] for v in cache.values],
        slots=slots,
        n_items=cache.n_items[index],
        next_order=cache.next_order[index],
    )


def _score_cached_batch(
    model: HMAT, batch: Sequence[Timeline], n_cached: Sequence[int], device: torch.device
) -> list[list[float]]:
    """Scores of the first ``n_cached[b]`` events of each timeline, by rounds over the batch."""
    T = model.config.max_items
    histories = [UserSequence(tl.profile, tl.sids[-T:], tl.actions[-T:]) for tl in batch]
    cache = encode_history(model, build_stream(histories, model.config.layout).to(device))
    alive = list(range(len(batch)))  # batch positions held by the cache, in cache row order
    out: list[list[float]] = [[] for _ in batch]
    for r in range(max(n_cached, default=0)):
        cands = torch.stack([batch[b].event_sids[r : r + 1] for b in alive]).to(device)  # (B', 1, k)
        scores = score_with_cache(model, cache, cands)[:, 0].float().cpu().tolist()  # (B',)
        for b, p in zip(alive, scores, strict=True):
            out[b].append(p)
        grow = [i for i, b in enumerate(alive) if r + 1 < n_cached[b]]
        if not grow:
            break
        if len(grow) < len(alive):
            cache = _select(cache, torch.tensor(grow, device=device))
            alive = [alive[i] for i in grow]
        sids = torch.stack([batch[b].event_sids[r : r + 1] for b in alive]).to(device)  # (B', 1, k)
        actions = torch.stack([batch[b].event_actions[r : r + 1] for b in alive]).to(device)  # (B', 1)
        cache = append_history(model, cache, sids, actions)
    return out


@torch.no_grad()
def score_timelines(
    model: HMAT,
    timelines: Sequence[Timeline],
    *,
    max_tokens: int = 32768,
    max_batch: int = 256,
    precision: Precision = "auto",
    progress: bool = True,
) -> np.ndarray:
    """P(positive) for every event, flattened in timeline then event order (R,): equal to
    ``score_examples(model, timeline_examples(timelines, max_items))`` up to summation order."""
    model.eval()
    device = next(model.parameters()).device
    amp_dtype = resolve_precision(precision, device)
    T, layout = model.config.max_items, model.config.layout
    counts = [len(tl.event_sids) for tl in timelines]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out = np.full(int(starts[-1]), np.nan, dtype=np.float64)
    n_cached = [_cacheable(len(tl.sids), n, T) for tl, n in zip(timelines, counts, strict=True)]
    # Events past the sliding point: full streams, by definition.
    rest = timeline_examples(timelines, T, skip=n_cached)
    rest_at = [j for i in range(len(timelines)) for j in range(starts[i] + n_cached[i], starts[i + 1])]
    if rest:
        out[rest_at] = score_examples(
            model, rest, max_tokens=max_tokens, max_batch=max_batch, precision=precision, progress=progress
        )
    # Cached events, users batched by history length.
    todo = [i for i in range(len(timelines)) if n_cached[i]]
    lengths = [len(timelines[i].profile) + min(len(timelines[i].sids), T) * layout.item_len for i in todo]
    batches = [[todo[j] for j in b] for b in pack_batches(lengths, max_tokens, max_batch)]
    with autocast(device, amp_dtype):
        for batch in tqdm(batches, desc="score (cached)", disable=not progress, unit="batch"):
            scores = _score_cached_batch(model, [timelines[i] for i in batch], [n_cached[i] for i in batch], device)
            for i, s in zip(batch, scores, strict=True):
                out[starts[i] : starts[i] + n_cached[i]] = s
    return out
