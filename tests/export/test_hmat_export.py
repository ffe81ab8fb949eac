"""ONNX export of HMAT with memory-anchor attention as custom ops (export/graphs.py, export/anchor_attention.py).

The oracle is the PyTorch model: ``reference_attention`` for the ops (under the dense mask,
``CachedBlocks.dense`` for the cached one), ``rank_candidates`` / ``encode_history`` /
``score_with_cache`` for the graphs, on the same seeded inputs.

Tolerance: 1e-4 absolute, in fp32. ONNX Runtime and PyTorch evaluate the same fp32
expression with different kernels (GEMM blocking, softmax and RMSNorm reductions, the
fused SDPA versus MatMul-Softmax-MatMul), so results differ by rounding only: observed
below 5e-7 on probabilities and 2e-6 on cached keys/values. 1e-4 leaves a wide margin for
other CPUs and ORT versions while any semantic slip (a mask entry, a coordinate, a GQA
head mapping) moves these scrambled-weight outputs by 1e-2 or more.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
import torch

from export import graphs as ex
from export.anchor_attention import CACHED_OP_NAME, DOMAIN, ONNX_OP_NAME, anchor_attention_op, attach_function
from models.hmat.checkpoint import save_checkpoint
from models.hmat.inference import encode_history, rank_candidates, score_with_cache
from models.hmat.mask import CachedBlocks
from models.hmat.model import HMAT, HMATConfig, reference_attention, repeat_kv
from models.hmat.sequence import UserSequence, build_stream
from models.hmat.testing import scrambled, tiny_config

ATOL = 1e-4
GRAPHS = ex.GRAPHS
GRAPH_OP = {"ranking": ONNX_OP_NAME, "encode_history": ONNX_OP_NAME, "score_with_cache": CACHED_OP_NAME}


def user(cfg: HMATConfig, n_items: int, n_candidates: int = 0, n_profile: int = 2) -> UserSequence:
    return UserSequence(
        profile=torch.randint(cfg.profile_vocab_size, (n_profile,)).tolist(),
        sids=torch.randint(cfg.codebook_size, (n_items, cfg.n_sid)),
        actions=torch.randint(cfg.n_actions, (n_items,)),
        candidates=torch.randint(cfg.codebook_size, (n_candidates, cfg.n_sid)),
    )


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))


class Exported(dict):
    """Graph name -> exported ModelProto, each exported on first use (about 10 s each on CPU)."""

    def __init__(self, model: HMAT) -> None:
        super().__init__()
        self.model = model

    def __missing__(self, graph: str) -> onnx.ModelProto:
        self[graph] = ex.export_graph(self.model, graph, tokenizer_version="tok-test")
        return self[graph]


@pytest.fixture(scope="module")
def exported() -> tuple[HMAT, Exported]:
    """One tiny model and its graphs, exported once for the module."""
    torch.manual_seed(0)
    model = scrambled(HMAT(tiny_config()))
    return model, Exported(model)


# --- The op ----------------------------------------------------------------------------------


def test_op_matches_the_oracle_with_gqa() -> None:
    q = torch.randn(2, 4, 5, 8)  # (B, H, S, D), H = 2 * G
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)  # (B, G, Sk, D)
    mask = torch.rand(2, 5, 7) > 0.5
    mask[..., 0] = True  # no empty row (attention_mask guarantees one)
    expected = reference_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), mask[:, None], 0.0)
    torch.testing.assert_close(torch.ops.hisam.anchor_attention(q, k, v, mask), expected, atol=1e-5, rtol=0)


def test_onnx_function_body_matches_the_oracle() -> None:
    """One bare hisam node plus the attached function, run by stock ONNX Runtime."""
    h = onnx.helper
    f32, b8 = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    graph = h.make_graph(
        [h.make_node(ONNX_OP_NAME, ["q", "k", "v", "mask"], ["y"], domain=DOMAIN)],
        "one_op",
        [
            h.make_tensor_value_info("q", f32, ["B", "H", "S", "D"]),
            h.make_tensor_value_info("k", f32, ["B", "G", "K", "D"]),
            h.make_tensor_value_info("v", f32, ["B", "G", "K", "D"]),
            h.make_tensor_value_info("mask", b8, ["B", "S", "K"]),
        ],
        [h.make_tensor_value_info("y", f32, ["B", "H", "S", "D"])],
    )
    proto = attach_function(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))
    onnx.checker.check_model(proto, full_check=True)
    for B, H, G, S, Sk in [(2, 4, 2, 5, 7), (1, 6, 3, 3, 11), (3, 4, 4, 1, 2)]:
        q, k, v = torch.randn(B, H, S, 8), torch.randn(B, G, Sk, 8), torch.randn(B, G, Sk, 8)
        mask = torch.rand(B, S, Sk) > 0.5
        mask[..., 0] = True
        expected = reference_attention(q, repeat_kv(k, H // G), repeat_kv(v, H // G), mask[:, None], 0.0)
        (got,) = session(proto).run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()})
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


def test_cached_block_function_body_matches_the_oracle() -> None:
    """One bare hisam.CachedBlockAttention node plus its function: slots then own block, no mask input."""
    h = onnx.helper
    f32, b8 = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
    names = ["q", "k", "v", "k_past", "v_past", "slot_valid"]
    dims = [["B", "H", "S", "D"], *[["B", "G", "S", "D"]] * 2, *[["B", "G", "M", "D"]] * 2, ["B", "M"]]
    block = 3
    graph = h.make_graph(
        [h.make_node(CACHED_OP_NAME, names, ["y"], domain=DOMAIN, block=block)],
        "one_op",
        [h.make_tensor_value_info(n, b8 if n == "slot_valid" else f32, d) for n, d in zip(names, dims, strict=True)],
        [h.make_tensor_value_info("y", f32, ["B", "H", "S", "D"])],
    )
    proto = attach_function(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))
    onnx.checker.check_model(proto, full_check=True)
    assert [f.name for f in proto.functions] == [CACHED_OP_NAME]
    for B, H, G, N, M in [(2, 4, 2, 4, 7), (1, 6, 3, 1, 5), (3, 4, 4, 2, 1)]:
        S = N * block
        q, k, v = torch.randn(B, H, S, 8), torch.randn(B, G, S, 8), torch.randn(B, G, S, 8)
        k_past, v_past = torch.randn(B, G, M, 8), torch.randn(B, G, M, 8)
        valid = torch.rand(B, M) > 0.3
        mask = CachedBlocks(valid, block).dense(S)  # (B, S, M + S)
        k_all, v_all = torch.cat([k_past, k], 2), torch.cat([v_past, v], 2)
        expected = reference_attention(q, repeat_kv(k_all, H // G), repeat_kv(v_all, H // G), mask[:, None], 0.0)
        feed = dict(zip(names, (t.numpy() for t in (q, k, v, k_past, v_past, valid)), strict=True))
        (got,) = session(proto).run(None, feed)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


def test_model_through_the_op_equals_its_own_forward() -> None:
    cfg = tiny_config()
    model = scrambled(HMAT(cfg))
    stream = build_stream([user(cfg, 4, 3), user(cfg, 1, 2, n_profile=1)], cfg.layout)
    expected = model.forward_stream(stream, attn_impl="reference")
    with torch.no_grad(), anchor_attention_op(model):
        got = model.forward_stream(stream)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the swap is undone


def test_op_path_and_export_refuse_training_mode() -> None:
    model = HMAT(tiny_config()).train()
    with pytest.raises(ValueError, match="eval"), anchor_attention_op(model):
        pass
    with pytest.raises(ValueError, match="eval"):
        ex.export_graph(model, "ranking", tokenizer_version=None)


# --- The exported graphs -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("graph", GRAPHS)
def test_graph_holds_the_custom_node_its_function_and_metadata(exported, graph: str) -> None:
    model, protos = exported
    proto = protos[graph]
    assert {n.op_type for n in proto.graph.node if n.domain == DOMAIN} == {GRAPH_OP[graph]}
    assert [(f.domain, f.name) for f in proto.functions] == [(DOMAIN, GRAPH_OP[graph])]
    assert {o.domain: o.version for o in proto.opset_import}[DOMAIN] == 1
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model_version"] == ex.model_version(model)
    assert props["tokenizer_version"] == "tok-test"
    assert props["graph"] == graph
    assert HMATConfig(**json.loads(props["config"])) == model.config


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[(5, 4), (2, 1), (0, 3)], [(8, 6)], [(3, 2)] * 5], ids=["B3", "B1", "B5"])
def test_ranking_matches_pytorch_at_several_shapes(exported, sizes: list[tuple[int, int]]) -> None:
    model, protos = exported
    cfg = model.config
    stream = build_stream([user(cfg, t, n) for t, n in sizes], cfg.layout)
    expected = rank_candidates(model, stream)  # (B, N), NaN where a user has fewer
    got = run(session(protos["ranking"]), ex.ranking_feed(stream, cfg.rope))["scores"]
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL, rtol=0)  # NaN positions must agree too


@pytest.mark.slow
def test_cache_graph_builds_no_dense_mask(exported) -> None:
    """One hisam.CachedBlockAttention per layer (block = k + 1), and no tensor anywhere with an axis
    over [slots, new tokens] (the dense mask's key axis, "slots + 4*candidates" at k = 3)."""
    model, protos = exported
    cfg = model.config
    proto = onnx.shape_inference.infer_shapes(protos["score_with_cache"])
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert len(nodes) == cfg.n_layer
    assert all(onnx.helper.get_attribute_value(n.attribute[0]) == cfg.n_sid + 1 for n in nodes)
    axes = {d.dim_param for v in proto.graph.value_info for d in v.type.tensor_type.shape.dim if d.dim_param}
    assert "slots" in axes and f"{cfg.n_sid + 1}*candidates" in axes  # shape inference named them
    assert not [a for a in axes if "slots" in a and "candidates" in a]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sizes", "n_candidates"), [([(5, 2), (2, 1), (0, 2)], 4), ([(8, 3)], 1)], ids=["B3N4", "B1N1"]
)
def test_cache_graphs_match_pytorch(exported, sizes: list[tuple[int, int]], n_candidates: int) -> None:
    model, protos = exported
    cfg = model.config
    users = [user(cfg, t, n_profile=p) for t, p in sizes]
    stream = build_stream(users, cfg.layout)
    expected_cache = encode_history(model, stream)
    cache = ex.cache_from_outputs(run(session(protos["encode_history"]), ex.stream_feed(stream, cfg.rope)))
    assert cache.n_slots == expected_cache.n_slots
    for f in ex.SLOT_FIELDS:
        assert torch.equal(getattr(cache.slots, f), getattr(expected_cache.slots, f)), f
    assert torch.equal(cache.n_items, expected_cache.n_items)
    assert torch.equal(cache.next_order, expected_cache.next_order)
    for got, want in zip(cache.keys + cache.values, expected_cache.keys + expected_cache.values, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)

    candidates = torch.randint(cfg.codebook_size, (len(users), n_candidates, cfg.n_sid))
    got = run(session(protos["score_with_cache"]), ex.cache_feed(cache, candidates))["scores"]
    np.testing.assert_allclose(got, score_with_cache(model, expected_cache, candidates).numpy(), atol=ATOL, rtol=0)
    full = build_stream(
        [dataclasses.replace(u, candidates=c) for u, c in zip(users, candidates, strict=True)], cfg.layout
    )
    np.testing.assert_allclose(got, rank_candidates(model, full).numpy(), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_inlined_graph_runs_without_the_custom_domain(exported) -> None:
    """TensorRT route 1 (export/graphs.py): inlining the function leaves standard ops only, same result."""
    model, protos = exported
    cfg = model.config
    inlined = onnx.inliner.inline_local_functions(protos["ranking"])
    assert not inlined.functions and all(n.domain != DOMAIN for n in inlined.graph.node)
    feed = ex.ranking_feed(build_stream([user(cfg, 3, 2), user(cfg, 1, 3)], cfg.layout), cfg.rope)
    np.testing.assert_allclose(
        run(session(inlined), feed)["scores"], run(session(protos["ranking"]), feed)["scores"], atol=1e-6, rtol=0
    )


# --- Bad input ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("bad_id", ["vocab_size", -1], ids=["too-large", "negative"])
def test_unknown_token_id_gives_nan_for_that_user_only(exported, bad_id: str | int) -> None:
    """PyTorch raises; a graph cannot, so the user's scores are NaN and the batch still runs."""
    model, protos = exported
    cfg = model.config
    stream = build_stream([user(cfg, 3, 2), user(cfg, 2, 2)], cfg.layout)
    expected = rank_candidates(model, stream)
    stream.tokens[0, 3] = cfg.vocab_size if bad_id == "vocab_size" else bad_id
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rank_candidates(model, stream)
    got = run(session(protos["ranking"]), ex.ranking_feed(stream, cfg.rope))["scores"]
    assert np.isnan(got[0]).all()
    np.testing.assert_allclose(got[1], expected[1].numpy(), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_unknown_candidate_code_gives_nan_for_that_user_only(exported) -> None:
    model, protos = exported
    cfg = model.config
    stream = build_stream([user(cfg, 3), user(cfg, 2)], cfg.layout)
    cache = encode_history(model, stream)
    candidates = torch.randint(cfg.codebook_size, (2, 3, cfg.n_sid))
    expected = score_with_cache(model, cache, candidates)
    candidates[1, 2, 0] = cfg.codebook_size  # would alias into the next codebook's ids
    got = run(session(protos["score_with_cache"]), ex.cache_feed(cache, candidates))["scores"]
    assert np.isnan(got[1]).all()
    np.testing.assert_allclose(got[0], expected[0].numpy(), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_encode_history_marks_a_stream_with_candidates(exported) -> None:
    """PyTorch refuses such a stream; the graph poisons that user's cache with NaN instead."""
    model, protos = exported
    cfg = model.config
    stream = build_stream([user(cfg, 3), user(cfg, 2, n_candidates=1)], cfg.layout)
    with pytest.raises(ValueError, match="without candidates"):
        encode_history(model, stream)
    out = run(session(protos["encode_history"]), ex.stream_feed(stream, cfg.rope))
    assert np.isnan(out["keys"][:, 1]).all() and not np.isnan(out["keys"][:, 0]).any()


# --- Model variants ----------------------------------------------------------------------------


@pytest.mark.slow
def test_rope1d_anchor_only_checkpoint_exports_and_matches(tmp_path) -> None:
    torch.manual_seed(1)
    cfg = tiny_config(rope="rope1d", action_is_memory=False)
    model = scrambled(HMAT(cfg))
    save_checkpoint(tmp_path / "ckpt", model, tokenizer_version="tok-ckpt")
    paths = ex.export_checkpoint(tmp_path / "ckpt", tmp_path / "onnx", version="v-test", graphs=["ranking"])
    proto = onnx.load(str(paths["ranking"]))
    props = {p.key: p.value for p in proto.metadata_props}
    assert (props["model_version"], props["tokenizer_version"], props["rope"]) == ("v-test", "tok-ckpt", "rope1d")
    stream = build_stream([user(cfg, 4, 3), user(cfg, 0, 1)], cfg.layout)
    got = run(session(proto), ex.ranking_feed(stream, cfg.rope))["scores"]
    np.testing.assert_allclose(got, rank_candidates(model, stream).numpy(), atol=ATOL, rtol=0)
