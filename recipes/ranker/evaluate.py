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
  rarely meets more than one cold item in a chronological split; the item-cold split and
  its within-user measures (cold-item GAUC, recall/NDCG@k) are in recipes/coldstart.
A metric with no defined value (one class only, or no rows) is NaN, never a made-up 0.5.

Scoring runs one-pass ranking (docs/method.md §4: candidates as blocks after the history,
block-diagonal mask) over streams sorted by length and packed up to a token budget, so
padding stays small although histories range from a few to a few thousand tokens. The
trunk runs under the chosen precision; the action head reads the hidden state in fp32, as
the near-line trainer's prequential scores do (trainer/learner.py): bf16 probabilities fall
on a grid of a few hundred values and tie, which biases AUC.

Timelines (the "stream" protocol, recipes/ranker/sequences.py): a user's history followed by
test events, event k scored against the history plus events 0..k-1 (the last
``max_items`` of them), then appended with its observed action. ``timeline_examples``
states that definition as one stream per event, scored by ``score_examples``; it costs
O(events x history) tokens, each built token by token in Python. ``score_timelines``
computes the same scores grouped by user (``event_groups``):

- the user's leading events, as long as history + earlier events fit in ``max_items``,
  share one stream ``[profile, history, c_0, e_0, c_1, e_1, .., c_n]``: c_k is event k's
  candidate block, e_k event k as a history item with its observed action. The mask is
  causal in logical order and keeps candidate blocks apart from every other token
  (models/hmat/mask.py), and a token's state depends only on what it may attend: the
  exactness argument of the anchor KV cache (docs/method.md §4). So c_k sees exactly the
  history and events 0..k-1, at the coordinates of the definition's stream for event k
  (item i = history + k + 1, flat position re-aligned to it), and one forward pass
  encodes the history once and scores every such event. (The cache API of
  models/hmat/inference.py would need one ``append_history`` per event, since
  ``score_with_cache`` shows every candidate the whole cache.)
- once the window slides (history + earlier events pass ``max_items``), the window drops
  an item per event and every kept item's state changes, so each later event is a
  stream of its own: exactly the definition's, ``max_items`` items and one candidate.

Both kinds are built in tensor ops on the scoring device from one table of every item's
vocabulary ids (``_group_streams``), with the coordinates of ``models.hmat.sequence``
(tested field by field against ``build_stream``), and packed several users per forward.
Scores equal the definition's up to floating-point summation order (tested to 1e-5 per
row in fp32, metrics to 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from models.device import Precision, autocast, resolve_precision
from models.hmat.model import HMAT
from models.hmat.sequence import StreamLayout, TokenStream, TokenType, UserSequence, build_stream

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


def _anchor_scores(
    model: HMAT, stream: TokenStream, amp_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, block, P(positive)) of every candidate anchor of ``stream``, each (n,).

    The trunk runs under ``amp_dtype``, the head in fp32 (module docstring).
    """
    with autocast(stream.tokens.device, amp_dtype):
        hidden = model.forward_stream(stream)  # (B, S, C)
    b, s = (stream.token_type == TokenType.CAND_ANCHOR).nonzero(as_tuple=True)
    return b, stream.block[b, s], model.positive_prob(hidden[b, s].float())


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
        b, block, p = (t.cpu().numpy() for t in _anchor_scores(model, stream, amp_dtype))
        out[starts[np.asarray(batch)[b]] + block] = p
    return out


# --- Timelines: the stream protocol, by definition and grouped by user -----------------------


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


def event_groups(timelines: Sequence[Timeline], max_items: int) -> list[tuple[int, int, int]]:
    """(timeline, first event, events) of every stream ``score_timelines`` runs, in timeline order.

    A timeline's leading events share a stream while history + earlier events fit in
    ``max_items`` (event 0 always: its history is cut to the last ``max_items``, as in the
    definition); each event after the window starts to slide is a stream of its own.
    """
    groups = []
    for i, tl in enumerate(timelines):
        t0, n = len(tl.sids), len(tl.event_sids)
        if n == 0:
            continue
        shared = min(n, max(1, max_items - t0 + 1))  # event k shares while t0 + k <= max_items
        groups.append((i, 0, shared))
        groups += [(i, k, 1) for k in range(shared, n)]
    return groups


@dataclass
class _ItemTable:
    """Every timeline's items (history, then events) as vocabulary ids, back to back, on one device."""

    item_tokens: torch.Tensor  # (I, k + 2): k semantic-ID ids, ANCHOR, the action's id
    first_item: torch.Tensor  # (U,) row of each timeline's first history item
    n_history: torch.Tensor  # (U,) T0
    profile_tokens: torch.Tensor  # (U, P_max) vocabulary ids; past a profile's length, never read
    profile_len: torch.Tensor  # (U,)


def _as_long(x: Sequence | torch.Tensor, width: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long)
    return t.reshape(-1) if width is None else t.reshape(-1, width)


def _item_table(timelines: Sequence[Timeline], layout: StreamLayout, device: torch.device) -> _ItemTable:
    """The table ``_group_streams`` reads; ``ValueError`` naming the timeline of any id ``build_stream`` would refuse."""
    k = layout.n_sid
    for i, tl in enumerate(timelines):
        if len(tl.sids) != len(tl.actions) or len(tl.event_sids) != len(tl.event_actions):
            raise ValueError(f"timeline {i}: every history item and event needs one action")
        if len(tl.profile) > layout.max_profile_len:
            raise ValueError(f"timeline {i}: profile has {len(tl.profile)} tokens, more than {layout.max_profile_len}")
    codes = torch.cat([_as_long(x, k) for tl in timelines for x in (tl.sids, tl.event_sids)])  # (I, k)
    actions = torch.cat([_as_long(x) for tl in timelines for x in (tl.actions, tl.event_actions)])  # (I,)
    n_items = torch.tensor([len(tl.sids) + len(tl.event_sids) for tl in timelines], dtype=torch.long)
    first_item = torch.cumsum(n_items, 0) - n_items  # (U,)
    p_len = torch.tensor([len(tl.profile) for tl in timelines], dtype=torch.long)
    profiles = torch.zeros(len(timelines), max(1, int(p_len.max())), dtype=torch.long)  # (U, P_max)
    for i, tl in enumerate(timelines):
        profiles[i, : len(tl.profile)] = _as_long(tl.profile)
    bad_item = ((codes < 0) | (codes >= layout.codebook_size)).any(1) | (actions < 0) | (actions >= layout.n_actions)
    bad_profile = ((profiles < 0) | (profiles >= layout.profile_vocab_size)).any(1)
    if bool(bad_item.any()):
        user = int(torch.searchsorted(first_item, bad_item.nonzero()[0], right=True)[0]) - 1
        raise ValueError(f"timeline {user}: a semantic ID or action is outside its vocabulary")
    if bool(bad_profile.any()):
        raise ValueError(
            f"timeline {int(bad_profile.nonzero()[0])}: a profile id is outside [0, {layout.profile_vocab_size})"
        )
    sid = layout.sid_offset + torch.arange(k) * layout.codebook_size + codes  # (I, k)
    anchor = torch.full_like(actions[:, None], layout.anchor_id)
    item_tokens = torch.cat([sid, anchor, layout.action_offset + actions[:, None]], 1)  # (I, k + 2)
    profile_tokens = layout.profile_offset + profiles  # read only where a profile token is
    n_history = torch.tensor([len(tl.sids) for tl in timelines], dtype=torch.long)
    return _ItemTable(*(t.to(device) for t in (item_tokens, first_item, n_history, profile_tokens, p_len)))


def _group_length(p_len, n_history, n_events, item_len: int):
    """Tokens of a group's stream: profile, history, then n_events candidate blocks with n_events - 1
    items between (ints, or tensors of them)."""
    return p_len + (n_history + n_events - 1) * item_len + n_events * (item_len - 1)


def _group_streams(
    table: _ItemTable, layout: StreamLayout, max_items: int, groups: torch.Tensor, width: int
) -> TokenStream:
    """The right-padded streams (B, ``width``) of ``groups`` (B, 3) = (timeline, first event, events).

    Stream b: profile, the last <= ``max_items`` items before its first event, then per
    event its candidate block followed (except after the last) by the event as a history
    item (module docstring). Coordinates as ``models.hmat.sequence._user_rows`` assigns
    them to the definition's stream of each event; ``order`` is the position in the stream.
    """
    L, k = layout.item_len, layout.n_sid
    user, first, count = groups.unbind(1)  # (B,) each
    end = table.n_history[user] + first  # items before the first event
    start = (end - max_items).clamp(min=0)  # first history item in the stream
    P = table.profile_len[user][:, None]  # (B, 1)
    H = (end - start)[:, None]  # (B, 1) history items in the stream
    length = _group_length(P, H, count[:, None], L)  # (B, 1)
    pos = torch.arange(width, device=groups.device)[None, :]  # (1, S)
    valid = pos < length
    profile = pos < P
    rel = pos - P  # position after the profile
    tail = rel - H * L  # position after the history: (candidate block, event item) periods of 2L - 1
    in_history = (rel >= 0) & (tail < 0)
    e = tail.clamp(min=0) // (2 * L - 1)  # (B, S) the group's event a tail position belongs to
    w = tail.clamp(min=0) - e * (2 * L - 1)
    candidate = valid & (tail >= 0) & (w < L - 1)
    t = torch.where(in_history, rel.clamp(min=0) // L, H + e)  # 0-based item of the stream (a candidate's: H + e)
    j = torch.where(profile, pos, torch.where(in_history, rel.clamp(min=0) % L, torch.where(w < L - 1, w, w - L + 1)))
    row = (table.first_item[user] + start)[:, None] + t  # (B, S) row of item_tokens
    item_token = table.item_tokens[row.clamp(max=table.item_tokens.shape[0] - 1), j.clamp(max=L - 1)]
    profile_token = table.profile_tokens[user[:, None], pos.clamp(max=table.profile_tokens.shape[1] - 1)]
    item_type = torch.where(
        j < k, int(TokenType.SID), torch.where(j == k, int(TokenType.ANCHOR), int(TokenType.ACTION))
    )
    cand_type = torch.where(j < k, int(TokenType.CAND_SID), int(TokenType.CAND_ANCHOR))
    token_type = torch.where(profile, int(TokenType.PROFILE), torch.where(candidate, cand_type, item_type))
    token_type = torch.where(valid, token_type, int(TokenType.PAD))
    item = torch.where(valid, torch.where(profile, 0, t + 1), -1)
    flat = torch.where(profile, pos, P + t * L + j)  # the definition's order; a candidate re-aligned to its item
    return TokenStream(
        tokens=torch.where(valid, torch.where(profile, profile_token, item_token), 0),
        token_type=token_type,
        item=item,
        block=torch.where(candidate, e, -1),
        order=torch.where(valid, pos, -1),
        pos_i=item.clamp(min=0),
        pos_j=torch.where(valid, j, 0),
        pos_flat=torch.where(valid, flat, 0),
    )


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
    ``score_examples(model, timeline_examples(timelines, max_items))`` up to summation order,
    a stream per user rather than per event (module docstring)."""
    model.eval()
    device = next(model.parameters()).device
    amp_dtype = resolve_precision(precision, device)
    T, layout = model.config.max_items, model.config.layout
    counts = [len(tl.event_sids) for tl in timelines]
    starts = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.long, device=device)
    out = torch.full((sum(counts),), float("nan"), dtype=torch.float64, device=device)
    if not out.numel():
        return out.cpu().numpy()
    table = _item_table(timelines, layout, device)
    groups = event_groups(timelines, T)
    lengths = []
    for i, first, n in groups:
        t0, p = len(timelines[i].sids), len(timelines[i].profile)
        lengths.append(_group_length(p, min(t0 + first, T), n, layout.item_len))
    for batch in tqdm(pack_batches(lengths, max_tokens, max_batch), desc="score", disable=not progress, unit="batch"):
        rows = torch.tensor([groups[g] for g in batch], dtype=torch.long, device=device)  # (B, 3)
        stream = _group_streams(table, layout, T, rows, max(lengths[g] for g in batch))
        b, block, p = _anchor_scores(model, stream, amp_dtype)
        out[starts[rows[b, 0]] + rows[b, 1] + block] = p.double()
    return out.cpu().numpy()
