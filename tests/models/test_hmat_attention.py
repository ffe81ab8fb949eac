"""Structured attention paths (models/hmat/attention.py) against the dense oracle (docs/method.md §3-§4).

The oracle is ``model.reference_attention`` (explicit fp32 softmax) under the dense
``mask.attention_mask``, on the same seeded inputs. Compared on real query rows only:
padding rows attend different (but non-empty) key sets on each path, and nothing reads them.

Tolerance: 1e-5 in fp32, forward and gradients. Both sides evaluate the same fp32 sums in
a different order (the fused SDPA kernel blocks keys and rescales its running softmax, and
the structured path splits each row's keys over a memory prefix and a window), so they
differ by rounding: observed below 2e-6 on outputs and on gradients w.r.t. q, k, v, all of
order 1, so 1e-5 is absolute there. A parameter's gradient sums per-token terms over the
whole batch and reaches 1e2 with scrambled weights, and its rounding grows with it (SDPA
against the oracle under the same dense mask differs by 3e-5 at 73): there the bound is
1e-5 of the gradient's largest entry (``assert_close_scaled``). Any wrong mask entry (a key
seen twice, or missed) moves these scrambled inputs by 1e-2 or more.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.hmat.anchor_op import cached_block_anchor_attention
from models.hmat.attention import (
    cached_block_attention,
    flex_attention_blocks,
    flex_blocks,
    structured_attention,
)
from models.hmat.losses import pt_loss, sft_loss
from models.hmat.mask import CachedBlocks, PlainCausal, StreamBlocks, attention_mask, stream_blocks
from models.hmat.model import HMAT, HMATConfig, reference_attention, repeat_kv, resolve_attn_impl
from models.hmat.sequence import TokenStream, UserSequence, build_stream
from models.hmat.testing import scrambled, tiny_config

ATOL = 1e-5
RULES = {
    "ma": {"memory_anchor": True, "action_is_memory": True},
    "anchor-only": {"memory_anchor": True, "action_is_memory": False},
    "causal": {"memory_anchor": False, "action_is_memory": True},
}
CONFIGS = {
    "ma": {},
    "anchor-only": {"action_is_memory": False},
    "no-ma": {"ma_attn": False},
    "rope1d": {"rope": "rope1d"},
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CI has no GPU")


def user(cfg: HMATConfig, n_items: int, n_candidates: int = 0, n_profile: int = 2) -> UserSequence:
    return UserSequence(
        profile=torch.randint(cfg.profile_vocab_size, (n_profile,)).tolist(),
        sids=torch.randint(cfg.codebook_size, (n_items, cfg.n_sid)),
        actions=torch.randint(cfg.n_actions, (n_items,)),
        candidates=torch.randint(cfg.codebook_size, (n_candidates, cfg.n_sid)),
    )


def batch(cfg: HMATConfig, candidates: bool = True) -> TokenStream:
    """Right-padded users of different lengths, profiles of 0 to 4 tokens, an empty history, candidates."""
    n = (lambda c: c) if candidates else (lambda c: 0)
    sizes = [(9, n(3), 2), (2, n(1), 0), (0, n(2), 4), (5, n(0), 1)]
    return build_stream([user(cfg, t, c, p) for t, c, p in sizes], cfg.layout)


def qkv(B: int, S: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, 4, S, 16) and k, v (B, 2, S, 16): GQA with 2 query heads per key head; leaves (flex needs D >= 16)."""
    shapes = [(B, 4, S, 16), (B, 2, S, 16), (B, 2, S, 16)]
    return tuple(torch.randn(s, device=device).requires_grad_() for s in shapes)


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return reference_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), mask[:, None], 0.0)


def grads(out: torch.Tensor, rows: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Gradients of a seeded random projection of the real rows' outputs w.r.t. ``inputs``."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    loss = (out * weight * rows[:, None, :, None]).sum()
    return torch.autograd.grad(loss, inputs)


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """|got - want| <= 1e-5 * max |want| everywhere (module docstring: parameter gradients)."""
    torch.testing.assert_close(got, want, atol=ATOL * float(want.abs().max()), rtol=0, msg=msg)


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, rows: torch.Tensor) -> None:
    """(B, H, S, D) outputs on the real rows ``rows`` (B, S)."""
    torch.testing.assert_close(got.transpose(1, 2)[rows], want.transpose(1, 2)[rows], atol=ATOL, rtol=0)


# --- The structured path (any device, the CPU default) -------------------------------------------


@pytest.mark.parametrize("chunk", [3, 8, 64], ids=["chunk3", "chunk8", "chunk64"])
@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
def test_structured_attention_equals_the_dense_oracle(rule: str, chunk: int) -> None:
    """Forward and gradients w.r.t. q, k, v; chunks that cut items and candidate blocks in two."""
    cfg = tiny_config()
    stream = batch(cfg)
    B, S = stream.tokens.shape
    q, k, v = qkv(B, S)
    blocks = stream_blocks(stream, **RULES[rule], chunk=chunk)
    assert len(blocks.chunks) == -(-S // chunk)
    got = structured_attention(q, k, v, blocks, 0.0)
    want = oracle(q, k, v, attention_mask(stream, stream, **RULES[rule]))
    rows = stream.valid
    assert_rows_close(got, want, rows)
    for g_got, g_want in zip(grads(got, rows, (q, k, v)), grads(want, rows, (q, k, v)), strict=True):
        torch.testing.assert_close(g_got, g_want, atol=ATOL, rtol=0)


def test_structured_padding_rows_are_finite() -> None:
    """Padding queries produce finite outputs (NaN would leak through 0 * NaN into later layers)."""
    cfg = tiny_config()
    stream = build_stream([user(cfg, 6, 2), UserSequence(), user(cfg, 0, 0, 1)], cfg.layout)  # one user all padding
    q, k, v = qkv(*stream.tokens.shape)
    out = structured_attention(q, k, v, stream_blocks(stream, **RULES["ma"], chunk=5), 0.0)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


@pytest.mark.parametrize("changes", list(CONFIGS.values()), ids=list(CONFIGS))
def test_model_structured_equals_reference(changes: dict) -> None:
    """The whole model: hidden states and every parameter's gradient, 24-item histories (3 chunks of 64)."""
    cfg = tiny_config(max_items=24, **changes)
    model = scrambled(HMAT(cfg)).train()  # dropout is 0: train mode changes nothing but autograd
    sizes = [(24, 3, 2), (7, 2, 0), (0, 1, 4), (15, 0, 1)]
    stream = build_stream([user(cfg, t, c, p) for t, c, p in sizes], cfg.layout)
    assert isinstance(model.stream_attention_mask(stream, attn_impl="structured"), StreamBlocks)
    rows = stream.valid
    outputs, gradients = [], []
    for impl in ("structured", "reference"):
        model.zero_grad(set_to_none=True)
        hidden = model.forward_stream(stream, attn_impl=impl)  # (B, S, C)
        weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(3))
        (hidden * weight * rows[..., None]).sum().backward()
        outputs.append(hidden.detach()[rows])
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=0)
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 10
    for name, g in gradients[0].items():
        assert_close_scaled(g, gradients[1][name], name)


@pytest.mark.parametrize("changes", [{}, {"ma_attn": False}], ids=["ma", "no-ma"])
def test_training_losses_and_gradients_match_the_oracle(changes: dict) -> None:
    """SFT (MA-Attn, or the causal ablation through is_causal) and PT (is_causal) as the trainer calls them."""
    cfg = tiny_config(**changes)
    model = scrambled(HMAT(cfg)).train()
    stream = batch(cfg, candidates=False)
    for loss_fn in (sft_loss, pt_loss):
        results = []
        for impl in ("auto", "reference"):
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, stream, attn_impl=impl)
            loss.backward()
            grads_by_name = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((loss.detach(), grads_by_name))
        torch.testing.assert_close(results[0][0], results[1][0], atol=ATOL, rtol=0)
        assert results[0][1].keys() == results[1][1].keys()
        for name, g in results[0][1].items():
            assert_close_scaled(g, results[1][1][name], f"{loss_fn.__name__}: {name}")


def test_plain_causal_streams_skip_the_mask() -> None:
    """PT and the causal ablation without candidates take is_causal; with candidates they need the blocks."""
    cfg = tiny_config()
    model = HMAT(cfg)
    history, ranked = batch(cfg, candidates=False), batch(cfg)
    assert isinstance(model.stream_attention_mask(history, causal=True, attn_impl="structured"), PlainCausal)
    assert isinstance(model.stream_attention_mask(history, attn_impl="structured"), StreamBlocks)
    assert isinstance(model.stream_attention_mask(ranked, causal=True, attn_impl="structured"), StreamBlocks)
    assert isinstance(model.stream_attention_mask(history, attn_impl="sdpa"), torch.Tensor)


def test_auto_picks_the_path_per_device() -> None:
    assert HMATConfig().attn_impl == "auto"
    assert resolve_attn_impl("auto", torch.device("cpu")) == "structured"
    assert resolve_attn_impl("auto", torch.device("cuda")) == "sdpa"  # until hisam bench gpu measures the others
    assert resolve_attn_impl("sdpa", torch.device("cuda")) == "sdpa"
    with pytest.raises(ValueError, match="attn_impl"):
        HMATConfig(attn_impl="dense")


# --- Candidates against a cache --------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 16], ids=["group1", "group2", "group16"])
def test_cached_block_attention_equals_the_dense_oracle(group: int) -> None:
    """Groups of candidate blocks that do not divide N (5), padding slots, GQA; and the op's eager kernel."""
    B, M, N, b = 2, 7, 5, 4
    q, k, v = qkv(B, N * b)
    k_past, v_past = torch.randn(B, 2, M, 16), torch.randn(B, 2, M, 16)
    valid = torch.ones(B, M, dtype=torch.bool)
    valid[1, 4:] = False
    blocks = CachedBlocks(valid, b)
    with torch.no_grad():
        got = cached_block_attention(q, k, v, (k_past, v_past), blocks, group=group)
        want = oracle(q, torch.cat([k_past, k], 2), torch.cat([v_past, v], 2), blocks.dense(N * b))
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        op = cached_block_anchor_attention(q, k, v, k_past, v_past, valid, b)
        torch.testing.assert_close(op, want, atol=ATOL, rtol=0)


# --- FlexAttention (CUDA) ----------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
def test_flex_attention_equals_the_dense_oracle(rule: str) -> None:
    """fp32 on CUDA, forward and gradients w.r.t. q, k, v (TF32 off: IEEE fp32 dot products)."""
    cfg = tiny_config(max_items=40)
    stream = build_stream([user(cfg, t, c, p) for t, c, p in [(40, 3, 2), (11, 0, 1), (0, 2, 0)]], cfg.layout)
    stream = stream.to("cuda")
    q, k, v = qkv(*stream.tokens.shape, device="cuda")
    got = flex_attention_blocks(q, k, v, flex_blocks(stream, **RULES[rule]))
    want = oracle(q, k, v, attention_mask(stream, stream, **RULES[rule]))
    rows = stream.valid
    assert_rows_close(got, want, rows)
    for g_got, g_want in zip(grads(got, rows, (q, k, v)), grads(want, rows, (q, k, v)), strict=True):
        torch.testing.assert_close(g_got, g_want, atol=ATOL, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_model_on_cuda_matches_reference_on_every_path() -> None:
    cfg = dataclasses.replace(tiny_config(max_items=24), n_head=4, n_kv_head=2)
    model = scrambled(HMAT(cfg)).cuda()
    stream = build_stream([user(cfg, 24, 3), user(cfg, 5, 1, 0)], cfg.layout).to("cuda")
    assert type(model.stream_attention_mask(stream, attn_impl="flex")).__name__ == "FlexBlocks"
    with torch.no_grad():
        want = model.forward_stream(stream, attn_impl="reference")
        for impl in ("auto", "sdpa", "structured", "flex"):
            got = model.forward_stream(stream, attn_impl=impl)
            torch.testing.assert_close(got[stream.valid], want[stream.valid], atol=ATOL, rtol=0, msg=impl)


def test_flex_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="FlexAttention"):
        resolve_attn_impl("flex", torch.device("cpu"))
