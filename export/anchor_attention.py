"""The ONNX face of ``hisam::anchor_attention`` (models/hmat/anchor_op.py, docs/method.md §3-§4).

Letters and the op's contract are those of ``models/hmat/anchor_op.py``.

- ONNX node: the exporter maps the op to ``onnx_stub``, which emits one bare node
  ``hisam.AnchorAttention`` (domain ``hisam``, opset version 1) instead of tracing inside.
- ONNX function: ``AnchorAttention`` below, the same computation in standard ONNX ops,
  attached to the exported model by ``attach_function``. ONNX Runtime inlines it when
  no kernel for ``hisam.AnchorAttention`` is registered, so every runtime can run the
  model; a registered fused kernel (an ORT custom-op library; a TensorRT plugin, see
  graphs.py) takes precedence over the body (docs/operations.md; no such kernel exists yet).
  The body groups the query heads as (B, G, R, S, D) and broadcasts keys over R.

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

from models.hmat.anchor_op import anchor_attention  # noqa: F401  registers torch.ops.hisam.anchor_attention
from models.hmat.model import HMAT

DOMAIN = "hisam"
DOMAIN_VERSION = 1
ONNX_OP_NAME = "AnchorAttention"
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


def _register_schema() -> None:
    """Declare ``hisam.AnchorAttention`` to onnx (process-wide, once): the exporter builds
    nodes from a schema, and the checker then validates the node's inputs against it."""
    if onnx.defs.has(ONNX_OP_NAME, DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    onnx.defs.register_schema(
        onnx.defs.OpSchema(
            ONNX_OP_NAME,
            DOMAIN,
            DOMAIN_VERSION,
            "Memory-anchor attention with GQA (models/hmat/anchor_op.py); output has q's shape.",
            inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("mask", "tensor(bool)")],
            outputs=[param("out", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q, k, v and out")],
        )
    )


_register_schema()


def onnx_stub(q, k, v, mask):
    """Exporter translation: one bare ``hisam.AnchorAttention`` node, body attached later."""
    return HISAM.AnchorAttention(q, k, v, mask)


CUSTOM_TRANSLATION_TABLE = {torch.ops.hisam.anchor_attention.default: onnx_stub}


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


def function_proto() -> onnx.FunctionProto:
    """The ``hisam.AnchorAttention`` ONNX function (domain ``hisam``, standard-op body)."""
    return AnchorAttention.to_function_proto()


def attach_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the ``hisam.AnchorAttention`` function to ``model`` (in place) and import its domain.

    The body uses opset 18 ops; the model's own default-domain opset must be >= 18 (the
    dynamo exporter's default is).
    """
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default is None or default < 18:
        raise ValueError(f"model imports default opset {default}; the AnchorAttention body needs >= 18")
    fn = function_proto()
    del fn.opset_import[:]
    fn.opset_import.extend([onnx.helper.make_opsetid("", default)])  # one default opset per model
    existing = [i for i, f in enumerate(model.functions) if (f.domain, f.name) == (DOMAIN, ONNX_OP_NAME)]
    for i in reversed(existing):
        del model.functions[i]
    model.functions.append(fn)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model
