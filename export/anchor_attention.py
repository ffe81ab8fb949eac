"""The ONNX face of ``hisam::anchor_attention`` and ``hisam::cached_block_attention``
(models/hmat/anchor_op.py, docs/method.md §3-§4).

Letters and the ops' contracts are those of ``models/hmat/anchor_op.py``.

- ONNX nodes: the exporter maps each op to a stub (``onnx_stub``, ``cached_block_stub``)
  that emits one bare node, ``hisam.AnchorAttention`` or ``hisam.CachedBlockAttention``
  (domain ``hisam``, opset version 1; the block size as the int attribute ``block``),
  instead of tracing inside.
- ONNX functions: ``AnchorAttention`` and ``CachedBlockAttention`` below, the same
  computations in standard ONNX ops, attached to the exported model by ``attach_function``
  (each where the graph uses it). ONNX Runtime inlines them when no kernel for the node is
  registered, so every runtime can run the model; a registered fused kernel (an ORT
  custom-op library; a TensorRT plugin, see graphs.py) takes precedence over the body
  (docs/operations.md; no such kernel exists yet). The bodies group the query heads as
  (B, G, R, S, D) and broadcast keys over R.
- ``CachedBlockAttention`` builds no mask over the new tokens: it scores the queries
  against the M slots (one GEMM per head) and each candidate block against itself
  ((b, b) per block), and softmaxes the two parts together, O(S (M + b)) instead of
  ``AnchorAttention``'s O(S (M + S)) under a (B, S, M + S) mask (the ``score_with_cache``
  graph, export/graphs.py).

``anchor_attention_op(model)`` switches a model's attention to the op for the duration of a
block (export); tests compare it with the model's own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import onnxscript
import torch
from onnxscript import FLOAT
from onnxscript import opset18 as op

from models.hmat.anchor_op import anchor_attention  # noqa: F401  registers both torch.ops.hisam ops
from models.hmat.model import HMAT

DOMAIN = "hisam"
DOMAIN_VERSION = 1
ONNX_OP_NAME = "AnchorAttention"
CACHED_OP_NAME = "CachedBlockAttention"
HISAM = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)


@contextlib.contextmanager
def anchor_attention_op(model: HMAT) -> Iterator[HMAT]:
    """Run ``model``'s attention through ``hisam::anchor_attention`` inside the block.

    Inference only: raises ``ValueError`` if the model is in training mode (the op has
    no dropout and no autograd formula).
    """
    if model.training:
        raise ValueError("anchor_attention_op is for inference: call model.eval() first")
    previous = model.config.attn_impl
    model.config.attn_impl = "custom_op"  # Attention.forward's custom_op branch
    try:
        yield model
    finally:
        model.config.attn_impl = previous


# --- ONNX ------------------------------------------------------------------------------------


def _register_schemas() -> None:
    """Declare ``hisam.AnchorAttention`` and ``hisam.CachedBlockAttention`` to onnx (process-wide,
    once): the exporter builds nodes from a schema, and the checker then validates the
    node's inputs against it."""
    param = onnx.defs.OpSchema.FormalParameter
    floats = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q, k, v (and the cache) and out")]
    if not onnx.defs.has(ONNX_OP_NAME, DOMAIN):
        onnx.defs.register_schema(
            onnx.defs.OpSchema(
                ONNX_OP_NAME,
                DOMAIN,
                DOMAIN_VERSION,
                "Memory-anchor attention with GQA (models/hmat/anchor_op.py); output has q's shape.",
                inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("mask", "tensor(bool)")],
                outputs=[param("out", "T")],
                type_constraints=floats,
            )
        )
    if not onnx.defs.has(CACHED_OP_NAME, DOMAIN):
        block = onnx.defs.OpSchema.Attribute(
            "block", onnx.defs.OpSchema.AttrType.INT, "tokens per candidate block", required=True
        )
        onnx.defs.register_schema(
            onnx.defs.OpSchema(
                CACHED_OP_NAME,
                DOMAIN,
                DOMAIN_VERSION,
                "Candidate blocks against cached slots with GQA (models/hmat/anchor_op.py); output has q's shape.",
                inputs=[
                    param("q", "T"),
                    param("k", "T"),
                    param("v", "T"),
                    param("k_past", "T"),
                    param("v_past", "T"),
                    param("slot_valid", "tensor(bool)"),
                ],
                outputs=[param("out", "T")],
                type_constraints=floats,
                attributes=[block],
            )
        )


_register_schemas()


def onnx_stub(q, k, v, mask):
    """Exporter translation: one bare ``hisam.AnchorAttention`` node, body attached later."""
    return HISAM.AnchorAttention(q, k, v, mask)


def cached_block_stub(q, k, v, k_past, v_past, slot_valid, block: int):
    """Exporter translation: one bare ``hisam.CachedBlockAttention`` node, body attached later."""
    return HISAM.CachedBlockAttention(q, k, v, k_past, v_past, slot_valid, block=block)


CUSTOM_TRANSLATION_TABLE = {
    torch.ops.hisam.anchor_attention.default: onnx_stub,
    torch.ops.hisam.cached_block_attention.default: cached_block_stub,
}


@onnxscript.script(HISAM, default_opset=op)
def AnchorAttention(q, k, v, mask):  # CamelCase: ONNX op names
    """The ONNX function body: the op's contract (module docstring) in standard opset-18 ops."""
    qf = op.Cast(q, to=FLOAT.dtype)
    kf = op.Cast(k, to=FLOAT.dtype)
    vf = op.Cast(v, to=FLOAT.dtype)
    b = op.Shape(q, start=0, end=1)
    h = op.Shape(q, start=1, end=2)
    s = op.Shape(q, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    g = op.Shape(k, start=1, end=2)
    r = op.Div(h, g)
    # Scale q, not the scores: S * D multiplications instead of S * Sk. The Mul follows the
    # Reshape because with Mul(Cast(q)) first ONNX Runtime 1.32 refused the inlined model
    # ("input '_inlfunc_AnchorAttention_qf' is not ... output of a previous node").
    scale = op.Div(op.Constant(value_float=1.0), op.Sqrt(op.Cast(d, to=FLOAT.dtype)))
    q5 = op.Mul(op.Reshape(qf, op.Concat(b, g, r, s, d, axis=0)), scale)  # (B, G, R, S, D): head h = g * R + r
    kt = op.Unsqueeze(op.Transpose(kf, perm=[0, 1, 3, 2]), [2])  # (B, G, 1, D, Sk)
    v5 = op.Unsqueeze(vf, [2])  # (B, G, 1, Sk, D)
    scores = op.MatMul(q5, kt)  # (B, G, R, S, Sk)
    neg_inf = op.Constant(value_float=float("-inf"))
    scores = op.Where(op.Unsqueeze(mask, [1, 2]), scores, neg_inf)  # mask (B, 1, 1, S, Sk)
    probs = op.Softmax(scores, axis=-1)
    out = op.Reshape(op.MatMul(probs, v5), op.Shape(q))  # (B, G, R, S, D) -> (B, H, S, D)
    return op.CastLike(out, q)


@onnxscript.script(HISAM, default_opset=op)
def CachedBlockAttention(q, k, v, k_past, v_past, slot_valid, block: int):  # CamelCase: ONNX op names
    """The ONNX function body of ``hisam::cached_block_attention`` in standard opset-18 ops.

    q (B, H, S, D) with S = N * block; k, v (B, G, S, D); k_past, v_past (B, G, M, D);
    slot_valid (B, M). Scores over the slots (B, G, R, S, M) and over the own block
    (B, G, R, N, b, b), lower-triangular, share one softmax per query row (a common max and
    one sum: no concatenation of the parts, which cost ONNX Runtime a copy of the scores
    each way).
    """
    qf = op.Cast(q, to=FLOAT.dtype)
    kf = op.Cast(k, to=FLOAT.dtype)
    vf = op.Cast(v, to=FLOAT.dtype)
    kpf = op.Cast(k_past, to=FLOAT.dtype)
    vpf = op.Cast(v_past, to=FLOAT.dtype)
    b = op.Shape(q, start=0, end=1)
    h = op.Shape(q, start=1, end=2)
    s = op.Shape(q, start=2, end=3)
    d = op.Shape(q, start=3, end=4)
    g = op.Shape(k, start=1, end=2)
    m = op.Shape(k_past, start=2, end=3)
    r = op.Div(h, g)
    one = op.Constant(value_ints=[1])
    blk = op.Reshape(op.Constant(value_int=block), one)  # (1,)
    n = op.Div(s, blk)
    scale = op.Div(op.Constant(value_float=1.0), op.Sqrt(op.Cast(d, to=FLOAT.dtype)))
    q5 = op.Mul(op.Reshape(qf, op.Concat(b, g, r, s, d, axis=0)), scale)  # (B, G, R, S, D), Mul after Reshape as above
    neg_inf = op.Constant(value_float=float("-inf"))
    # Slots: one (S, D) x (D, M) product per head; padding slots to -inf by an added bias (a
    # broadcast Add of (B, 1, 1, 1, M) runs faster in ONNX Runtime than a Where over the scores).
    kpt = op.Unsqueeze(op.Transpose(kpf, perm=[0, 1, 3, 2]), [2])  # (B, G, 1, D, M)
    bias = op.Unsqueeze(op.Where(slot_valid, op.Constant(value_float=0.0), neg_inf), [1, 2, 3])  # (B, 1, 1, 1, M)
    s_past = op.Add(op.MatMul(q5, kpt), bias)  # (B, G, R, S, M)
    s_past = op.Reshape(s_past, op.Concat(b, g, r, n, blk, m, axis=0))  # (B, G, R, N, b, M)
    # Own block: (b, D) x (D, b) per block, lower-triangular (key index <= query index).
    q6 = op.Reshape(q5, op.Concat(b, g, r, n, blk, d, axis=0))  # (B, G, R, N, b, D)
    k6 = op.Reshape(kf, op.Concat(b, g, one, n, blk, d, axis=0))  # (B, G, 1, N, b, D)
    v6 = op.Reshape(vf, op.Concat(b, g, one, n, blk, d, axis=0))  # (B, G, 1, N, b, D)
    i = op.Range(op.Constant(value_int=0), op.Constant(value_int=block), op.Constant(value_int=1))  # (b,)
    causal = op.LessOrEqual(op.Unsqueeze(i, [0]), op.Unsqueeze(i, [1]))  # (b, b): [query, key]
    s_own = op.Where(causal, op.MatMul(q6, op.Transpose(k6, perm=[0, 1, 2, 3, 5, 4])), neg_inf)  # (B, G, R, N, b, b)
    # One softmax over [slots, own block] per row without concatenating the parts: a shared
    # max (finite: every row holds its own token), then both exponentials over one sum.
    top = op.Max(op.ReduceMax(s_past, [-1], keepdims=1), op.ReduceMax(s_own, [-1], keepdims=1))  # (B, G, R, N, b, 1)
    e_past = op.Exp(op.Sub(s_past, top))  # (B, G, R, N, b, M)
    e_own = op.Exp(op.Sub(s_own, top))  # (B, G, R, N, b, b)
    denom = op.Add(op.ReduceSum(e_past, [-1], keepdims=1), op.ReduceSum(e_own, [-1], keepdims=1))  # (..., b, 1)
    y_past = op.MatMul(op.Reshape(e_past, op.Concat(b, g, r, s, m, axis=0)), op.Unsqueeze(vpf, [2]))  # (B, G, R, S, D)
    y_own = op.Reshape(op.MatMul(e_own, v6), op.Concat(b, g, r, s, d, axis=0))  # (B, G, R, S, D)
    y = op.Div(op.Add(y_past, y_own), op.Reshape(denom, op.Concat(b, g, r, s, one, axis=0)))  # (B, G, R, S, D)
    out = op.Reshape(y, op.Shape(q))  # (B, G, R, S, D) -> (B, H, S, D)
    return op.CastLike(out, q)


FUNCTIONS = {ONNX_OP_NAME: AnchorAttention, CACHED_OP_NAME: CachedBlockAttention}


def function_proto(name: str = ONNX_OP_NAME) -> onnx.FunctionProto:
    """The ONNX function ``hisam.<name>`` (domain ``hisam``, standard-op body)."""
    return FUNCTIONS[name].to_function_proto()


def attach_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the function of each ``hisam`` op that ``model``'s graph uses (in place) and import the domain.

    The bodies use opset 18 ops; the model's own default-domain opset must be >= 18 (the
    dynamo exporter's default is).
    """
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is None or default < 18:
        raise ValueError(f"model imports default opset {default}; the hisam function bodies need >= 18")
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    for name in (n for n in FUNCTIONS if n in used):
        fn = function_proto(name)
        del fn.opset_import[:]
        fn.opset_import.extend([onnx.helper.make_opsetid("", default)])  # one default opset per model
        existing = [i for i, f in enumerate(model.functions) if (f.domain, f.name) == (DOMAIN, name)]
        for i in reversed(existing):
            del model.functions[i]
        model.functions.append(fn)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model
