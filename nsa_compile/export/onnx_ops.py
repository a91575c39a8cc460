"""ONNX translations of ``torch.ops.nsa_compile.nsa_attention`` (onnxscript), used by `nsa_compile.export.to_onnx`.

Two modes:

* ``decomposed`` – `nsa_attention_decomposed`, an onnxscript function in standard ONNX operators only (MatMul,
  ReduceMax/ReduceSum, Exp, TopK, ScatterElements, GatherElements, Where, comparisons, …). It is a *dense masked*
  formulation of the README's semantics: every branch is computed over all ``Tk`` keys (O(T²) memory and time per
  head) with boolean masks, so batch and sequence length stay dynamic in one file and no loop or data-dependent
  shape is needed. After export the function is inlined into the main graph.
* ``plugin`` – one node ``nsa_compile::nsa_attention`` whose attributes carry the configuration, plus
  ``plugin_namespace`` / ``plugin_version`` for TensorRT's ONNX parser (a node of an unknown op becomes the plugin
  of that name, version and namespace). Its schema (with a shape-inference function) is registered with ``onnx``
  in this process so that ``onnx.checker`` can validate the node.

Layout of the decomposition (B batch, H query heads, Hkv key/value heads, G = H/Hkv, Tq queries that are the last Tq
of Tk key positions): a *potential* compression block and a *potential* selection block start at every key
position ``c``; only those that exist under the span-relative rules are valid (masks), so "block index" becomes
"start position" and ties between blocks resolve to the earlier position, as in the reference.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import BOOL, FLOAT
from onnxscript import opset18 as op


#: Custom domain of the plugin node and of the (inlined) decomposition function.
PLUGIN_DOMAIN = "nsa_compile"
PLUGIN_OP = "nsa_attention"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "nsa_compile"
#: Attributes of the plugin node, in the op's schema order (after the tensors q, k, v, gates, video_mask, attn_mask).
CONFIG_ATTRIBUTES = ("scale", "block_size", "block_stride", "selection_block_size", "top_n", "window_size")

_NEG_INF = float("-inf")
_TINY = 1.1754943508222875e-38  # smallest normal float32, the reference's clamp of softmax denominators

_DECOMP_DOMAIN = onnxscript.values.Opset("nsa_compile.decomposed", 1)


@onnxscript.script(_DECOMP_DOMAIN, default_opset=op)
def nsa_attention_decomposed(q: FLOAT[...], k: FLOAT[...], v: FLOAT[...], gates: FLOAT[...], video_mask: BOOL[...],
                             bias: FLOAT[...], scale: float, block_size: int, block_stride: int,
                             selection_block_size: int, top_n: int, window_size: int) -> FLOAT[...]:
    """Gated NSA for video queries, dense causal attention for text queries (README "Attention semantics").

    q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv], gates [B, H, Tq, 3], video_mask bool [B, Tm] (the last
    Tm positions), bias: additive float mask broadcastable to [B, H, Tq, Tk] (0 when the op has no attn_mask; it
    restricts the dense, selection and window branches, not compression). Returns [B, H, Tq, Dv].
    """
    # ---------------------------------------------------------------- sizes (1-D int64 tensors of one element)
    b_ = op.Shape(q, start=0, end=1)
    h_ = op.Shape(q, start=1, end=2)
    tq_ = op.Shape(q, start=2, end=3)
    hkv_ = op.Shape(k, start=1, end=2)
    tk_ = op.Shape(k, start=2, end=3)
    tm_ = op.Shape(video_mask, start=1, end=2)
    dv_ = op.Shape(v, start=3, end=4)
    g_ = op.Div(h_, hkv_)
    tk = op.Squeeze(tk_)
    tq = op.Squeeze(tq_)

    # ---------------------------------------------------------------- positions and video spans
    j = op.Range(0, tk, 1)  # [Tk] key positions
    p = op.Range(op.Sub(tk, tq), tk, 1)  # [Tq] query positions
    j_row = op.Unsqueeze(j, [0])  # [1, Tk]
    text_head = op.Cast(op.ConstantOfShape(op.Concat(b_, op.Sub(tk_, tm_), axis=0)), to=9)  # bool [B, Tk-Tm]
    is_video = op.Concat(text_head, op.Cast(video_mask, to=9), axis=1)  # [B, Tk]
    no_video = op.Cast(op.ConstantOfShape(op.Concat(b_, [1], axis=0)), to=9)  # [B, 1] False
    prev = op.Concat(no_video, op.Slice(is_video, [0], [-1], [1]), axis=1)
    nxt = op.Concat(op.Slice(is_video, [1], [9223372036854775807], [1]), no_video, axis=1)
    starts = op.And(is_video, op.Not(prev))  # first key of each span
    ends = op.And(is_video, op.Not(nxt))  # last key of each span
    # span_start[b, j] = max{j' ≤ j : starts[b, j']}, span_end[b, j] = min{j' ≥ j : ends[b, j']}, densely
    j_col = op.Unsqueeze(j, [1])  # [Tk, 1]
    before = op.LessOrEqual(j_row, j_col)  # [Tk(j), Tk(j')]: j' ≤ j
    after = op.GreaterOrEqual(j_row, j_col)  # j' ≥ j
    span_start = op.ReduceMax(op.Where(op.And(op.Unsqueeze(starts, [1]), before), j_row, 0), [2], keepdims=0)
    span_end = op.ReduceMin(op.Where(op.And(op.Unsqueeze(ends, [1]), after), j_row, tk), [2], keepdims=0)
    in_span = op.Sub(j_row, span_start)  # [B, Tk] offset inside the span (meaningful for video keys)

    # ---------------------------------------------------------------- compression: a block may start at every key
    cmp_end = op.Add(j_row, op.Sub(block_size, 1))  # [1, Tk] last key of the block starting at c
    cmp_valid = op.And(op.And(is_video, op.Equal(op.Mod(in_span, block_stride), 0)),
                       op.LessOrEqual(cmp_end, span_end))  # [B, Tk] complete blocks on the span grid
    # mean pooling as a 0/1 matrix product (sum, then divide, as torch.mean): pool[c, j] = c ≤ j < c + block_size
    pool = op.Cast(op.And(op.GreaterOrEqual(j_row, j_col), op.Less(j_row, op.Add(j_col, block_size))), to=1)
    k_cmp = op.Div(op.MatMul(pool, k), op.Cast(block_size, to=1))  # [B, Hkv, Tk, D]
    v_cmp = op.Div(op.MatMul(pool, v), op.Cast(block_size, to=1))

    # query heads in groups: [B, Hkv, G, Tq, D]
    q5 = op.Reshape(q, op.Concat(b_, hkv_, g_, tq_, op.Shape(q, start=3, end=4), axis=0))
    scale_t = op.CastLike(scale, q)
    p_col = op.Unsqueeze(p, [1])  # [Tq, 1]
    s_cmp = op.Mul(op.MatMul(q5, op.Unsqueeze(op.Transpose(k_cmp, perm=[0, 1, 3, 2]), [2])), scale_t)
    cmp_visible = op.And(op.Unsqueeze(cmp_valid, [1, 2, 3]), op.LessOrEqual(cmp_end, p_col))  # [B,1,1,Tq,Tk]
    s_cmp = op.Where(cmp_visible, s_cmp, _NEG_INF)
    m_cmp = op.ReduceMax(s_cmp, [-1], keepdims=1)
    m_cmp = op.Where(op.IsInf(m_cmp), op.CastLike(0.0, m_cmp), m_cmp)
    e_cmp = op.Exp(op.Sub(s_cmp, m_cmp))
    p_cmp = op.Div(e_cmp, op.Max(op.ReduceSum(e_cmp, [-1], keepdims=1), op.CastLike(_TINY, e_cmp)))
    o_cmp = op.MatMul(p_cmp, op.Unsqueeze(v_cmp, [2]))  # [B, Hkv, G, Tq, Dv]

    # ---------------------------------------------------------------- selection
    sel_valid = op.And(is_video, op.Equal(op.Mod(in_span, selection_block_size), 0))  # [B, Tk] block starts
    sel_end = op.Min(op.Add(j_row, op.Sub(selection_block_size, 1)), span_end)  # [B, Tk] last key of block at s
    sel_start = op.Where(is_video, op.Sub(j_row, op.Mod(in_span, selection_block_size)), tk)  # block of key j
    # overlap[b, c, s]: compression block at c overlaps selection block at s
    overlap = op.And(op.And(op.Unsqueeze(cmp_valid, [2]), op.Unsqueeze(sel_valid, [1])),
                     op.And(op.LessOrEqual(j_col, op.Unsqueeze(sel_end, [1])),
                            op.GreaterOrEqual(op.Transpose(cmp_end, perm=[1, 0]), j_row)))
    # scores: sum over the group's heads first, then over overlapping compression blocks (the reference's order)
    scores = op.MatMul(op.ReduceSum(p_cmp, [2], keepdims=0), op.Unsqueeze(op.Cast(overlap, to=1), [1]))
    own_start = op.Gather(sel_start, p, axis=1)  # [B, Tq]
    candidate = op.And(op.Unsqueeze(sel_valid, [1]),
                       op.Less(op.Unsqueeze(sel_end, [1]), op.Unsqueeze(own_start, [2])))  # [B, Tq, Tk]
    scores = op.Where(op.Unsqueeze(candidate, [1]), scores, _NEG_INF)  # [B, Hkv, Tq, Tk]
    n = op.Min(op.Reshape(top_n, [1]), tk_)
    top_values, top_index = op.TopK(scores, n, axis=-1, largest=1, sorted=1)  # ties: the lower index first
    picked = op.Not(op.IsInf(top_values))
    selected = op.ScatterElements(op.Cast(op.ConstantOfShape(op.Shape(scores)), to=9), top_index, picked, axis=-1)
    # chosen[b, h, i, j]: key j lies in a selected block (text keys read index 0 and are kept anyway)
    key_block = op.Unsqueeze(op.Where(is_video, sel_start, 0), [1, 2])  # [B, 1, 1, Tk]
    chosen = op.GatherElements(selected, op.Expand(key_block, op.Shape(selected)), axis=3)  # [B, Hkv, Tq, Tk]
    own = op.GreaterOrEqual(j_row, op.Unsqueeze(own_start, [2]))  # [B, Tq, Tk]
    slc_keys = op.Or(op.Or(op.Unsqueeze(op.Not(is_video), [1, 2, 3]), op.Unsqueeze(chosen, [2])),
                     op.Unsqueeze(own, [1, 2]))  # [B, Hkv, 1, Tq, Tk]

    # ---------------------------------------------------------------- dense, selection and window over the keys
    causal = op.LessOrEqual(j_row, p_col)  # [Tq, Tk]
    window = op.And(causal, op.Greater(j_row, op.Sub(p_col, window_size)))
    full = op.Concat(b_, hkv_, g_, tq_, tk_, axis=0)
    dense_ok = op.Expand(causal, full)
    slc_ok = op.Expand(op.And(slc_keys, causal), full)
    swa_ok = op.Expand(window, full)
    allowed = op.Concat(op.Unsqueeze(dense_ok, [4]), op.Unsqueeze(slc_ok, [4]), op.Unsqueeze(swa_ok, [4]),
                        axis=4)  # [B, Hkv, G, Tq, 3, Tk]
    bias5 = op.Reshape(op.Expand(bias, op.Concat(b_, h_, tq_, tk_, axis=0)), full)
    s = op.Add(op.Mul(op.MatMul(q5, op.Unsqueeze(op.Transpose(k, perm=[0, 1, 3, 2]), [2])), scale_t), bias5)
    s = op.Where(allowed, op.Unsqueeze(s, [4]), _NEG_INF)
    m = op.ReduceMax(s, [-1], keepdims=1)
    m = op.Where(op.IsInf(m), op.CastLike(0.0, m), m)
    e = op.Exp(op.Sub(s, m))
    prob = op.Div(e, op.Max(op.ReduceSum(e, [-1], keepdims=1), op.CastLike(_TINY, e)))
    o3 = op.MatMul(prob, op.Unsqueeze(v, [2, 3]))  # [B, Hkv, G, Tq, 3, Dv]

    # ---------------------------------------------------------------- gates and the text/video choice
    o_dense = op.Squeeze(op.Slice(o3, [0], [1], [4]), [4])
    o_slc = op.Squeeze(op.Slice(o3, [1], [2], [4]), [4])
    o_swa = op.Squeeze(op.Slice(o3, [2], [3], [4]), [4])
    g5 = op.Reshape(op.CastLike(gates, q), op.Concat(b_, hkv_, g_, tq_, [3], axis=0))
    g_cmp = op.Slice(g5, [0], [1], [4])
    g_slc = op.Slice(g5, [1], [2], [4])
    g_swa = op.Slice(g5, [2], [3], [4])
    o_nsa = op.Add(op.Add(op.Mul(g_cmp, o_cmp), op.Mul(g_slc, o_slc)), op.Mul(g_swa, o_swa))
    video_q = op.Unsqueeze(op.Gather(is_video, p, axis=1), [1, 2, 4])  # [B, 1, 1, Tq, 1]
    out = op.Where(video_q, o_nsa, o_dense)
    return op.Reshape(out, op.Concat(b_, h_, tq_, dv_, axis=0))


# ---------------------------------------------------------------------------------------------- torch.onnx hooks
def _bias_from_attn_mask(attn_mask):
    """An SDPA-style attn_mask (bool: True = attend, or additive float) as an additive float32 bias."""
    if attn_mask is None:
        return op.Constant(value_float=0.0)
    if attn_mask.dtype == onnx.TensorProto.BOOL or str(attn_mask.dtype).endswith("BOOL"):
        return op.Where(attn_mask, op.Constant(value_float=0.0), op.Constant(value_float=_NEG_INF))
    return op.Cast(attn_mask, to=onnx.TensorProto.FLOAT)


def translate_decomposed(q, k, v, gates, video_mask, attn_mask=None, scale: float = 1.0, block_size: int = 64,
                         block_stride: int = 64, selection_block_size: int = 64, top_n: int = 32,
                         window_size: int = 256):
    """``torch.onnx.export`` translation of ``nsa_compile::nsa_attention`` in ``decomposed`` mode.

    Traced by the exporter (the op's optional ``attn_mask`` is resolved here in Python); computes in float32 like
    the reference does for half precision, and casts back to q's type.
    """
    out = nsa_attention_decomposed(
        op.Cast(q, to=onnx.TensorProto.FLOAT), op.Cast(k, to=onnx.TensorProto.FLOAT),
        op.Cast(v, to=onnx.TensorProto.FLOAT), op.Cast(gates, to=onnx.TensorProto.FLOAT),
        op.Cast(video_mask, to=onnx.TensorProto.BOOL), _bias_from_attn_mask(attn_mask),
        scale=float(scale), block_size=int(block_size), block_stride=int(block_stride),
        selection_block_size=int(selection_block_size), top_n=int(top_n), window_size=int(window_size))
    return op.CastLike(out, q)


# ---------------------------------------------------------------------------------------------- plugin mode
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


def plugin_output_shape(q_shape, v_shape):
    """Output shape of the NSA op / plugin from q [B, H, Tq, D] and v [B, Hkv, Tk, Dv]: [B, H, Tq, Dv].

    Works on any sequence of dims (ints, symbolic names, TensorRT shape expressions)."""
    if len(q_shape) != 4 or len(v_shape) != 4:
        raise ValueError(f"nsa_attention takes 4-D q and v; got ranks {len(q_shape)} and {len(v_shape)}")
    return [q_shape[0], q_shape[1], q_shape[2], v_shape[3]]


def _infer_plugin_node(ctx) -> None:
    """ONNX type and shape inference of ``nsa_compile::nsa_attention``: the type of q, shape [B, H, Tq, Dv]."""
    q_type = ctx.get_input_type(0)
    v_type = ctx.get_input_type(2)
    if isinstance(q_type, bytes):  # some onnx builds hand serialized protos
        q_type = onnx.TypeProto.FromString(q_type)
        v_type = onnx.TypeProto.FromString(v_type)
    out = onnx.TypeProto()
    out.tensor_type.elem_type = q_type.tensor_type.elem_type
    if q_type.tensor_type.HasField("shape") and v_type.tensor_type.HasField("shape"):
        qd, vd = list(q_type.tensor_type.shape.dim), list(v_type.tensor_type.shape.dim)
        if len(qd) == 4 and len(vd) == 4:
            for dim in plugin_output_shape(qd, vd):
                out.tensor_type.shape.dim.add().CopyFrom(dim)
    ctx.set_output_type(0, out)


def plugin_schema() -> onnx.defs.OpSchema:
    """The ONNX schema of the plugin node (registered with ``onnx`` by `register_plugin_schema`)."""
    S = onnx.defs.OpSchema
    attrs = [S.Attribute("scale", S.AttrType.FLOAT, "softmax scale"),
             *[S.Attribute(n, S.AttrType.INT, f"NSAConfig.{n}, in tokens") for n in CONFIG_ATTRIBUTES[1:]],
             S.Attribute("plugin_namespace", S.AttrType.STRING, "TensorRT plugin namespace", required=False),
             S.Attribute("plugin_version", S.AttrType.STRING, "TensorRT plugin version", required=False)]
    schema = S(
        PLUGIN_OP, PLUGIN_DOMAIN, 1,
        "Gated Native Sparse Attention over video tokens, dense causal attention for text tokens (nsa-compile). "
        "Inputs as torch.ops.nsa_compile.nsa_attention; attn_mask optional.",
        inputs=[S.FormalParameter("q", "T"), S.FormalParameter("k", "T"), S.FormalParameter("v", "T"),
                S.FormalParameter("gates", "G"), S.FormalParameter("video_mask", "B"),
                S.FormalParameter("attn_mask", "M", param_option=S.FormalParameterOption.Optional)],
        outputs=[S.FormalParameter("out", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "q, k, v and the output"), ("G", _FLOAT_TYPES, "gates"),
                          ("B", ["tensor(bool)"], "video mask"), ("M", _FLOAT_TYPES + ["tensor(bool)"], "mask")],
        attributes=attrs)
    schema.set_type_and_shape_inference_function(_infer_plugin_node)
    return schema


_REGISTERED: list[onnx.defs.OpSchema] = []


def register_plugin_schema() -> onnx.defs.OpSchema:
    """Register the plugin node's schema with ``onnx`` (once per process), so that the exporter can build the node
    and ``onnx.checker`` / shape inference can check it."""
    if not _REGISTERED:
        try:
            existing = onnx.defs.get_schema(PLUGIN_OP, 1, PLUGIN_DOMAIN)
        except onnx.defs.SchemaError:
            existing = None
        if existing is None:
            schema = plugin_schema()
            onnx.defs.register_schema(schema)
        _REGISTERED.append(onnx.defs.get_schema(PLUGIN_OP, 1, PLUGIN_DOMAIN))
    return _REGISTERED[0]


def translate_plugin(q, k, v, gates, video_mask, attn_mask=None, scale: float = 1.0, block_size: int = 64,
                     block_stride: int = 64, selection_block_size: int = 64, top_n: int = 32, window_size: int = 256):
    """``torch.onnx.export`` translation of ``nsa_compile::nsa_attention`` in ``plugin`` mode: one node
    ``nsa_compile::nsa_attention`` with the configuration as attributes."""
    node = onnxscript.values.Op(onnxscript.values.Opset(PLUGIN_DOMAIN, 1), PLUGIN_OP, register_plugin_schema())
    return node(q, k, v, gates, video_mask, attn_mask, scale=float(scale), block_size=int(block_size),
                block_stride=int(block_stride), selection_block_size=int(selection_block_size), top_n=int(top_n),
                window_size=int(window_size), plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION)
