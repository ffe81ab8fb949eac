"""Exporting HMAT to ONNX for serving (docs/method.md §4; Hi-SAM §3.4.2), with memory-anchor
attention as one custom operator (export/anchor_attention.py).

Letters: B users, S stream tokens, M cache slots, N candidates, k semantic IDs per item,
L layers, G key/value heads, D head dim, C hidden width, V vocabulary.

Three graphs, one per serving step (``export_graph(model, graph)``; ``export_all`` writes
them, ``export_checkpoint`` does so for a training checkpoint):

- ``ranking`` (one-pass parallel ranking, ``inference.rank_candidates``). Inputs, all
  int64: the stream fields ``tokens``, ``token_type``, ``item``, ``block``, ``order``
  (B, S) as ``sequence.build_stream`` makes them, ``positions`` (B, S, 2) =
  ``TokenStream.rotary_positions(config.rope)``, and ``anchor_index`` (B, N): where each
  candidate's anchor sits in the stream, -1 for none (``candidate_anchor_index``).
  Output ``scores`` (B, N) float32 = P(positive | candidate anchor), NaN where there is no
  candidate. (The index is an input because N, the largest candidate count, would be a
  data-dependent shape inside the graph.)
- ``encode_history`` (``inference.encode_history``). Inputs: the stream fields and
  ``positions`` of a history stream without candidates. Outputs: ``keys`` and ``values``
  (L, B, G, S, D), each user's kept slots (profile + memory tokens) packed to the left in
  stream order and zeros after; the slot metadata ``slot_token_type``, ``slot_item``,
  ``slot_block``, ``slot_order`` (B, S), padding after the kept slots; ``n_slots``,
  ``n_items``, ``next_order`` (B,). The graph keeps S slots because the packed width
  M = max(n_slots) depends on the data; the caller cuts to M (``cache_from_outputs``),
  which is where the memory saving of the anchor cache is realised.
- ``score_with_cache`` (``inference.score_with_cache``). Inputs: ``keys``, ``values``
  (L, B, G, M, D), the four slot fields (B, M), ``n_items``, ``next_order`` (B,) and
  ``candidates`` (B, N, k) semantic-ID codes. Output ``scores`` (B, N). The candidate
  tokens and their coordinates are built inside the graph, exactly as
  ``sequence.continue_stream`` builds them (tested against it).

Dynamic axes: B, S, M, N. Static: L, G, D, k (from the config).

Metadata (``ModelProto.metadata_props``): ``model_version`` (given, or a content hash of
config and weights), ``tokenizer_version`` (empty when unknown), ``config``
(``HMATConfig`` as JSON), ``graph`` (which of the three), ``rope``.

Bad input. The PyTorch path raises ``ValueError`` (``model.check_tokens``). A graph cannot
raise, and ONNX ``Gather`` would either fail the whole batch (index >= V) or silently wrap
(negative index), so the graphs check instead: a user whose stream holds a token id
outside [0, V) or a rotary coordinate outside the tables (or, for ``score_with_cache``, a
candidate code outside [0, K) or a history too long for the tables) gets NaN for all its
scores; ``encode_history`` gives such a user (and one whose stream holds candidates) NaN
keys and values, so every score computed from that cache is NaN. The other users of the
batch are unaffected, and ids are clamped before the lookups so the run never fails on
them. Metadata that does not follow ``build_stream`` (wrong token types, orders) is not
detected, as in PyTorch.

The custom ops. ``ranking`` and ``encode_history`` hold ``hisam.AnchorAttention`` nodes
(one per layer, except that ``encode_history`` drops the last layer's, whose output nothing
reads) under the dense mask; ``score_with_cache`` holds ``hisam.CachedBlockAttention`` nodes,
which read the mask as its structure (slot validity, and the block size k + 1 as an
attribute: every valid slot, then the candidate's own block) and build no (B, S, M + S)
mask. Domain ``hisam``, version 1; each graph carries the model-local ONNX function of its
op, whose body is standard ops (export/anchor_attention.py). Export: ``anchor_attention_op``
switches the model to ``attn_impl="custom_op"``, which routes attention through
``torch.ops.hisam.anchor_attention`` / ``torch.ops.hisam.cached_block_attention`` (K/V at G
heads: GQA inside the op); the dynamo exporter maps each op to a stub emitting the bare node
(``custom_translation_table``), and ``attach_function`` adds the bodies afterwards (the
exporter would otherwise inline a traced body).

TensorRT route (design; nothing here runs it, and the TensorRT details below are to be
checked against the TensorRT version deployed). Two ways to build an engine from these
files, chosen by what the file handed to the parser contains:
1. Inline. Inline the local functions first (``onnx.inliner.inline_local_functions``;
   tested to give the same scores under ONNX Runtime), so the parser sees standard ops
   only: per layer MatMul, Where, Softmax, MatMul. TensorRT may fuse that chain into its
   own attention kernel; if the mask or the GQA grouping blocks the fusion, the plain
   chain runs: correct, with the (B, G, R, S, Sk) scores materialised. No plugin, no C++.
2. Plugin. Drop the function from the file (``ModelProto.functions``) and keep the
   ``AnchorAttention`` nodes; the parser's plugin fallback then looks up a plugin creator
   by the node's op type (version and namespace from the node attributes
   ``plugin_version`` / ``plugin_namespace``, added to that copy if the plugin is
   registered under ``hisam``). The plugin (``IPluginV3``) is a FlashAttention-style
   kernel that reads key head h // R (GQA without copies) and skips key tiles the mask
   empties (under MA-Attn most history tokens are invisible to later queries, so most
   tiles are), with fp16/bf16 inputs and an fp32 softmax as the function body specifies.
   Shape rule: output = q's shape. The function body remains the specification; the
   plugin is tested against the ONNX Runtime run of the same file. The cache graph's
   ``CachedBlockAttention`` already takes the mask's structure instead of the mask, so
   its plugin reads no mask at all (slot validity and the block size only).
For Triton, either engine goes in a model directory whose ``config.pbtxt`` names the
inputs and outputs above with their dtypes and dynamic dims.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from export.anchor_attention import CUSTOM_TRANSLATION_TABLE, anchor_attention_op, attach_function
from models.hmat.checkpoint import load_checkpoint
from models.hmat.inference import AnchorKVCache, _kept, encode_history
from models.hmat.mask import CachedBlocks
from models.hmat.model import HMAT, HMATConfig
from models.hmat.sequence import TokenStream, TokenType, UserSequence, build_stream, candidate_stream

log = logging.getLogger(__name__)

Graph = Literal["ranking", "encode_history", "score_with_cache"]
GRAPHS: tuple[Graph, ...] = ("ranking", "encode_history", "score_with_cache")
STREAM_INPUTS = ("tokens", "token_type", "item", "block", "order", "positions")
SLOT_FIELDS = ("token_type", "item", "block", "order")  # what the mask reads of a cache slot
CACHE_INPUTS = ("keys", "values", *(f"slot_{f}" for f in SLOT_FIELDS), "n_items", "next_order")
OPSET = 18


# --- Input checks shared by the graphs ----------------------------------------------------


def _rope_limits(model: HMAT) -> tuple[int, int]:
    return model.rope.cos_a.shape[0], model.rope.cos_b.shape[0]


def _checked(
    model: HMAT, tokens: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, positions clamped into the tables, ok (B,): no id or coordinate was out of range)."""
    n_a, n_b = _rope_limits(model)
    V = model.config.vocab_size
    limits = torch.tensor([n_a, n_b], device=positions.device)
    ok_tok = ((tokens >= 0) & (tokens < V)).all(1)  # (B,)
    ok_pos = ((positions >= 0) & (positions < limits)).flatten(1).all(1)  # (B,)
    tokens = tokens.clamp(0, V - 1)
    positions = torch.minimum(positions.clamp_min(0), limits - 1)
    return tokens, positions, ok_tok & ok_pos


def _stream(
    tokens: torch.Tensor,
    token_type: torch.Tensor,
    item: torch.Tensor,
    block: torch.Tensor,
    order: torch.Tensor,
    positions: torch.Tensor,
) -> TokenStream:
    """A TokenStream for the mask; it reads type, item, block and order only."""
    return TokenStream(tokens, token_type, item, block, order, positions[..., 0], positions[..., 1], positions[..., 0])


# --- The three graphs as modules ------------------------------------------------------------


class RankingGraph(nn.Module):
    """One-pass ranking: stream fields + anchor_index (B, N) -> scores (B, N)."""

    def __init__(self, model: HMAT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: torch.Tensor,
        token_type: torch.Tensor,
        item: torch.Tensor,
        block: torch.Tensor,
        order: torch.Tensor,
        positions: torch.Tensor,
        anchor_index: torch.Tensor,
    ) -> torch.Tensor:
        m = self.model
        tokens, positions, ok = _checked(m, tokens, positions)
        stream = _stream(tokens, token_type, item, block, order, positions)
        hidden, _ = m(tokens, positions, m.stream_mask(stream, stream))  # (B, S, C)
        S = tokens.shape[1]
        index = anchor_index.clamp(0, S - 1)  # (B, N)
        anchors = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, N, C)
        is_anchor = (token_type.gather(1, index) == TokenType.CAND_ANCHOR) & (anchor_index >= 0) & (anchor_index < S)
        scores = m.positive_prob(anchors)  # (B, N)
        return torch.where(is_anchor & ok[:, None], scores, float("nan"))


class EncodeHistoryGraph(nn.Module):
    """History stream -> per-layer K/V of the kept slots (packed left, width S) + slot metadata."""

    def __init__(self, model: HMAT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: torch.Tensor,
        token_type: torch.Tensor,
        item: torch.Tensor,
        block: torch.Tensor,
        order: torch.Tensor,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        tokens, positions, ok = _checked(m, tokens, positions)
        ok = ok & (block < 0).all(1)  # a history stream holds no candidates
        stream = _stream(tokens, token_type, item, block, order, positions)
        _, present = m(tokens, positions, m.stream_mask(stream, stream))
        keep = _kept(stream, m.config)  # (B, S)
        # Stable packing without a sort (ONNX TopK promises no order among ties): a kept
        # token goes to (kept before it), a dropped one after all kept ones.
        count = keep.sum(1, keepdim=True)  # (B, 1)
        dest = torch.where(keep, keep.cumsum(1) - 1, count + (~keep).cumsum(1) - 1)  # (B, S) a permutation
        ar = torch.arange(tokens.shape[1], device=tokens.device).expand_as(dest)
        index = torch.zeros_like(dest).scatter(1, dest, ar)  # (B, S): slot m holds token index[b, m]
        valid = ar < count  # (B, S)
        slots = stream.gather(index, valid)
        fill = valid[:, None, :, None]  # (B, 1, S, 1)
        gidx = index[:, None, :, None].expand_as(present[0][0])  # (B, G, S, D)
        keys = torch.stack([torch.where(fill, k.gather(2, gidx), 0.0) for k, _ in present])  # (L, B, G, S, D)
        values = torch.stack([torch.where(fill, v.gather(2, gidx), 0.0) for _, v in present])
        bad = ~ok[None, :, None, None, None]
        keys, values = keys.masked_fill(bad, float("nan")), values.masked_fill(bad, float("nan"))
        return (keys, values, *(getattr(slots, f) for f in SLOT_FIELDS), count[:, 0], stream.n_items, stream.lengths)


class ScoreWithCacheGraph(nn.Module):
    """Cache + candidate codes (B, N, k) -> scores (B, N)."""

    def __init__(self, model: HMAT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        slot_token_type: torch.Tensor,
        slot_item: torch.Tensor,
        slot_block: torch.Tensor,
        slot_order: torch.Tensor,
        n_items: torch.Tensor,
        next_order: torch.Tensor,
        candidates: torch.Tensor,
    ) -> torch.Tensor:
        m = self.model
        B, N, k = candidates.shape
        ok_codes = ((candidates >= 0) & (candidates < m.config.codebook_size)).flatten(1).all(1)  # (B,)
        new = candidate_stream(m.config.layout, n_items, next_order, candidates.clamp(0, m.config.codebook_size - 1))
        tokens, positions, ok = _checked(m, new.tokens, new.rotary_positions(m.config.rope))
        # The mask as its structure (mask.CachedBlocks: every valid slot, then the candidate's own
        # block), through hisam.CachedBlockAttention: no (B, N (k + 1), M + N (k + 1)) mask. The other
        # slot fields stay inputs of the graph (serving feeds them, cache_feed) but are not read:
        # every valid slot is earlier than every candidate, whatever its type, item and order.
        blocks = CachedBlocks(slot_token_type != TokenType.PAD, k + 1)
        past = [(keys[layer], values[layer]) for layer in range(m.config.n_layer)]
        hidden, _ = m(tokens, positions, blocks, past)  # (B, N (k + 1), C)
        anchors = hidden.view(B, N, k + 1, -1)[:, :, k]  # (B, N, C): the anchor closes each block
        scores = m.positive_prob(anchors)
        return torch.where((ok & ok_codes)[:, None], scores, float("nan"))


# --- Host-side helpers (numpy in, numpy out, as a serving client would hold them) ----------


def candidate_anchor_index(stream: TokenStream) -> torch.Tensor:
    """(B, N) stream position of each candidate's anchor, by block; -1 where a user has fewer."""
    b, s = (stream.token_type == TokenType.CAND_ANCHOR).nonzero(as_tuple=True)
    n_max = int(stream.n_candidates.max()) if b.numel() else 0
    index = torch.full((stream.tokens.shape[0], n_max), -1, dtype=torch.long)
    index[b, stream.block[b, s]] = s
    return index


def stream_feed(stream: TokenStream, rope: str) -> dict[str, np.ndarray]:
    """The stream inputs of ``ranking`` and ``encode_history``."""
    fields = {f: getattr(stream, f) for f in STREAM_INPUTS[:-1]}
    return {k: v.cpu().numpy() for k, v in {**fields, "positions": stream.rotary_positions(rope)}.items()}


def ranking_feed(stream: TokenStream, rope: str) -> dict[str, np.ndarray]:
    return {**stream_feed(stream, rope), "anchor_index": candidate_anchor_index(stream).numpy()}


def cache_from_outputs(outputs: dict[str, np.ndarray]) -> AnchorKVCache:
    """``encode_history`` outputs -> ``AnchorKVCache`` cut to M = max(n_slots) slots."""
    M = int(outputs["n_slots"].max()) if outputs["n_slots"].size else 0
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in outputs.items()}
    zeros = torch.zeros_like(t["slot_order"][:, :M])
    slots = TokenStream(
        zeros, *(t[f"slot_{f}"][:, :M] for f in SLOT_FIELDS), zeros, zeros, zeros
    )  # positions are not needed: cached keys are already rotated
    return AnchorKVCache(
        keys=list(t["keys"][..., :M, :].unbind(0)),
        values=list(t["values"][..., :M, :].unbind(0)),
        slots=slots,
        n_items=t["n_items"],
        next_order=t["next_order"],
    )


def cache_feed(cache: AnchorKVCache, candidates: torch.Tensor) -> dict[str, np.ndarray]:
    """The inputs of ``score_with_cache``."""
    feed = {
        "keys": torch.stack(cache.keys),
        "values": torch.stack(cache.values),
        **{f"slot_{f}": getattr(cache.slots, f) for f in SLOT_FIELDS},
        "n_items": cache.n_items,
        "next_order": cache.next_order,
        "candidates": candidates,
    }
    return {k: v.cpu().numpy() for k, v in feed.items()}


# --- Export ----------------------------------------------------------------------------------


def graph_key(config: HMATConfig, *salt: str) -> str:
    """A key that changes whenever a traced graph could: the config, the sources of the exporter,
    the op and the model, the torch and onnx versions, and the caller's ``salt`` (e.g. a seed).
    Caches of exported graphs (templates, benchmarks, tests) are keyed by it."""
    from export import anchor_attention
    from models.hmat import anchor_op, attention, inference, mask, sequence
    from models.hmat import model as model_module

    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    modules = (sys.modules[__name__], anchor_attention, model_module, attention, anchor_op, sequence, mask, inference)
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    h.update("|".join((torch.__version__, onnx.__version__, *salt)).encode())
    return h.hexdigest()[:16]


def model_version(model: HMAT) -> str:
    """A content version: sha256 of the config and the weights (the tokenizer artifact's scheme)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return f"hmat-{h.hexdigest()[:12]}"


def _example_stream(model: HMAT, B: int = 2, n_items: int = 2, n_cand: int = 3) -> TokenStream:
    """Shape-only example inputs for tracing (values are valid but arbitrary)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    # Within the model's limits: a dataset without profile columns has a vocabulary of 1.
    profile = [t % cfg.profile_vocab_size for t in (1, 2)][: cfg.max_profile_len]
    users = [
        UserSequence(
            profile=profile,
            sids=torch.randint(cfg.codebook_size, (n_items + b, cfg.n_sid), generator=g),
            actions=torch.randint(cfg.n_actions, (n_items + b,), generator=g),
            candidates=torch.randint(cfg.codebook_size, (n_cand, cfg.n_sid), generator=g),
        )
        for b in range(B)
    ]
    return build_stream(users, cfg.layout)


def _graph_and_args(model: HMAT, graph: Graph) -> tuple[nn.Module, tuple, dict, list[str], list[str]]:
    """(module, example args, dynamic shapes, input names, output names) for ``graph``."""
    # Named dims: inputs that share a name share a size, and the ONNX dims carry the names.
    B, S, N, M = (torch.export.Dim(n) for n in ("batch", "seq", "candidates", "slots"))
    stream, history = _example_stream(model), _example_stream(model, n_cand=0)
    rope = model.config.rope
    if graph == "ranking":
        feed = ranking_feed(stream, rope)
        names = [*STREAM_INPUTS, "anchor_index"]
        dyn = {n: {0: B, 1: S} for n in STREAM_INPUTS} | {"anchor_index": {0: B, 1: N}}
        return RankingGraph(model), tuple(torch.from_numpy(feed[n]) for n in names), dyn, names, ["scores"]
    if graph == "encode_history":
        feed = stream_feed(history, rope)
        outputs = ["keys", "values", *(f"slot_{f}" for f in SLOT_FIELDS), "n_slots", "n_items", "next_order"]
        dyn = {n: {0: B, 1: S} for n in STREAM_INPUTS}
        return (
            EncodeHistoryGraph(model),
            tuple(torch.from_numpy(feed[n]) for n in STREAM_INPUTS),
            dyn,
            list(STREAM_INPUTS),
            outputs,
        )
    if graph == "score_with_cache":
        cache = encode_history(model, history)
        cands = stream.tokens.new_zeros(stream.tokens.shape[0], 3, model.config.n_sid)
        feed = cache_feed(cache, cands)
        names = [*CACHE_INPUTS, "candidates"]
        dyn = {"keys": {1: B, 3: M}, "values": {1: B, 3: M}}
        dyn |= {f"slot_{f}": {0: B, 1: M} for f in SLOT_FIELDS} | {"n_items": {0: B}, "next_order": {0: B}}
        dyn |= {"candidates": {0: B, 1: N}}
        return ScoreWithCacheGraph(model), tuple(torch.from_numpy(feed[n]) for n in names), dyn, names, ["scores"]
    raise ValueError(f"graph={graph!r} is not 'ranking', 'encode_history' or 'score_with_cache'")


def export_graph(
    model: HMAT,
    graph: Graph,
    path: str | Path | None = None,
    *,
    tokenizer_version: str | None,
    version: str | None = None,
) -> onnx.ModelProto:
    """Export one serving graph (module docstring) of ``model`` (fp32, eval mode); writes ``path`` if given.

    Raises ``ValueError`` for a model in training mode (the export path has no dropout).
    """
    if model.training:
        raise ValueError("export a model in eval mode: call model.eval() first")
    module, args, dyn, in_names, out_names = _graph_and_args(model, graph)
    module.eval()
    with torch.no_grad(), anchor_attention_op(model), warnings.catch_warnings():
        # Inputs sharing a named dim make the exporter say so once per input; that is the intent.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dyn,
            opset_version=OPSET,
            custom_translation_table=CUSTOM_TRANSLATION_TABLE,
            optimize=True,
            verbose=False,
        )
    proto = attach_function(program.model_proto)
    meta = {
        "model_version": version or model_version(model),
        "tokenizer_version": tokenizer_version or "",  # empty: unknown
        "config": json.dumps(dataclasses.asdict(model.config), sort_keys=True),
        "graph": graph,
        "rope": model.config.rope,
    }
    props = {p.key: p.value for p in proto.metadata_props} | meta  # keep what the exporter wrote
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"HMAT {graph} graph (export/graphs.py)"
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
        log.info("wrote %s (%.1f MB)", path, Path(path).stat().st_size / 1e6)
    return proto


def export_all(
    model: HMAT,
    out_dir: str | Path,
    *,
    tokenizer_version: str | None,
    version: str | None = None,
    graphs: Sequence[Graph] = GRAPHS,
) -> dict[Graph, Path]:
    """Write ``<graph>.onnx`` into ``out_dir`` for each of ``graphs`` (default: all three)."""
    version = version or model_version(model)
    paths: dict[Graph, Path] = {}
    for graph in graphs:
        paths[graph] = Path(out_dir) / f"{graph}.onnx"
        export_graph(model, graph, paths[graph], tokenizer_version=tokenizer_version, version=version)
    return paths


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, version: str | None = None, graphs: Sequence[Graph] = GRAPHS
) -> dict[Graph, Path]:
    """``export_all`` for a training checkpoint (train.py); its tokenizer version goes into the metadata."""
    model, config = load_checkpoint(checkpoint)
    return export_all(model, out_dir, tokenizer_version=config.get("tokenizer_version"), version=version, graphs=graphs)
