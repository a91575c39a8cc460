"""The NSA attention op: text queries attend densely and causally; video queries mix the three NSA branches with
their gates, ``o = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa`` (NSA arXiv 2502.11089 §3.2, eq. 5; VideoNSA arXiv
2510.02295 §3 for the text/video split).

`nsa_reference` is the plain-PyTorch oracle (differentiable, CPU and GPU, fp64 capable). The custom op
``torch.ops.nsa_compile.nsa_attention`` (with ``nsa_attention_backward``) stays one opaque node under
``torch.compile``, AOTAutograd and ``torch.export``; it runs the Triton kernels (`nsa_triton`) where `use_triton`
says so and the reference elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import warnings

import torch
from torch import Tensor

from .common import (MAX_HEAD_DIM, NSAInputError, NSAStrictError, causal_attention, check_inputs, key_bias,
                     video_layout)
from .compression import compression_reference
from .selection import select_blocks, selection_reference
from .sliding_window import sliding_window_reference


def nsa_reference(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor, attn_mask: Tensor | None = None,
                  scale: float | None = None, block_size: int = 64, block_stride: int = 64,
                  selection_block_size: int = 64, top_n: int = 32, window_size: int = 256,
                  decode: str = "dense") -> Tensor:
    """Gated NSA for video queries, dense causal attention for text queries (``decode="sparse"``: NSA for text
    queries too when the call extends a KV cache, see below).

    Args:
        q: [B, Hq, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; Hq a multiple of Hkv (any GQA group size);
            fp16 / bf16 / fp32 / fp64 (half precision is computed in fp32). Query i sits at position Tk−Tq+i.
        gates: [B, Hq, Tq, 3] gate values (compression, selection, sliding window), any float dtype; ignored for
            text queries.
        video_mask: bool [B, Tm] marking video tokens among the last Tm positions (Tq ≤ Tm ≤ Tk); earlier keys
            are text.
        attn_mask: optional SDPA-style mask broadcastable to [B, Hq, Tq, Tk] (bool, True = attend, or additive
            float), e.g. padding. It restricts the dense, selection and sliding-window keys; the compression branch
            pools only video spans, which never hold padding.
        scale: softmax scale, default 1/sqrt(D). The remaining ints are `NSAConfig` fields, in tokens.
        decode: `NSAConfig.decode`. ``"sparse"``: when Tq < Tk (the call extends a KV cache), a text query at
            position p with a video key before it attends like a video query: compressed blocks ending at or
            before p, the top-n video selection blocks ending at or before p (scored by its group-summed
            compression probabilities, earlier block on ties) plus every text key up to p, and the window, mixed
            by its gates. Pass a ``video_mask`` covering the cached keys (Tm = Tk) for the cached video to count.
    Returns:
        [B, Hq, Tq, Dv] in q's dtype. A branch with nothing to attend contributes zero.
    Raises:
        NSAInputError: shapes, dtypes or head dim out of range (see `check_inputs`), unknown ``decode``.
    """
    check_inputs(q, k, v, gates, video_mask)
    if decode not in ("dense", "sparse"):
        raise NSAInputError(f"decode must be 'dense' or 'sparse', got {decode!r}")
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cd = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q5 = q.to(cd).reshape(B, Hkv, G, Tq, D)
    k, v = k.to(cd), v.to(cd)
    layout = video_layout(video_mask.to(k.device), Tk, block_size, block_stride, selection_block_size)
    video_q = layout.is_video[:, Tk - Tq:]  # [B, Tq]
    bias = key_bias(attn_mask, B, Hkv, G, Tq, Tk, cd)
    if decode == "sparse" and Tq < Tk:
        # Text queries after video go NSA; a text query's "own block" starts after it, so its candidates are the
        # blocks ending at or before it (sel_start of text keys is only read as the query's own start).
        pos = torch.arange(Tk, device=k.device)
        video_before = (layout.is_video.long().cumsum(-1) - layout.is_video.long()) > 0
        video_q = video_q | video_before[:, Tk - Tq:]
        layout = dataclasses.replace(layout, sel_start=torch.where(layout.is_video, layout.sel_start, pos + 1))

    out = causal_attention(q5, k, v, scale, Tk, None, bias, rows=~video_q)
    if bool(video_q.any()):
        o_cmp, p_cmp = compression_reference(q5, k, v, layout, scale)
        selected = select_blocks(p_cmp, layout, Tq, top_n)
        o_slc = selection_reference(q5, k, v, layout, selected, scale, bias, rows=video_q)
        o_swa = sliding_window_reference(q5, k, v, window_size, scale, bias, rows=video_q)
        g = gates.to(cd).reshape(B, Hkv, G, Tq, 3)
        o_nsa = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_swa
        out = torch.where(video_q[:, None, None, :, None], o_nsa, out)
    return out.reshape(B, Hq, Tq, v.shape[-1]).to(q.dtype).contiguous()


# ----------------------------------------------------------------------------------------------- the custom op
def key_padding(attn_mask: Tensor, B: int, Tq: int, Tk: int, rows_per_check: int = 1 << 26) -> Tensor | None:
    """The keys an SDPA-style ``attn_mask`` leaves visible, when that is all it does within causal attention.

    Args:
        attn_mask: broadcastable to [B, Hq, Tq, Tk]; bool (True = attend) or additive float (0 / −inf).
        B, Tq, Tk: batch, queries, keys (query i at position Tk − Tq + i).
    Returns:
        bool [B|1, Tk] ``key_valid`` such that, for every query and every key at or before it, the mask lets the key
        through exactly when ``key_valid`` does (a causal mask, a padding mask, or both, as transformers builds
        them); None when the mask does anything else (different per head or per query within the causal region,
        finite biases): the op then runs the reference. The whole mask is read once, in chunks of about
        ``rows_per_check`` elements.
    """
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[-1] != Tk or m.shape[-2] not in (1, Tq) or m.shape[0] not in (1, B):
        return None

    def visible(x: Tensor) -> Tensor | None:
        if x.dtype == torch.bool:
            return x
        if not bool(((x == 0) | (x == float("-inf"))).all()):
            return None
        return x == 0

    last = visible(m[:, :, -1, :])  # the last query sees every key causally: its row is the key validity
    if last is None or (m.shape[1] > 1 and not bool((last == last[:, :1]).all())):
        return None
    key_valid = last[:, 0]  # [B|1, Tk]
    step = max(1, rows_per_check // max(1, m.shape[0] * m.shape[1] * Tk))
    j = torch.arange(Tk, device=m.device)
    for r0 in range(0, m.shape[-2], step):
        rows = visible(m[:, :, r0:r0 + step, :])
        if rows is None:
            return None
        p = Tk - Tq + torch.arange(r0, r0 + rows.shape[-2], device=m.device)
        after = j[None, :] > p[:, None]  # keys causal attention hides anyway
        if m.shape[-2] == 1:
            after = j[None, :] > Tk - Tq  # one row broadcast to all queries: must hold from the first query on
        if not bool(((rows | after) == (key_valid[:, None, None, :] | after)).all()):
            return None
    return key_valid


def max_head_dim(dtype: torch.dtype) -> int:
    """The largest head dim the Triton kernels take in ``dtype``: 256, or 128 for fp32 (shared memory)."""
    return 128 if dtype == torch.float32 else MAX_HEAD_DIM


def use_triton(q: Tensor, attn_mask: Tensor | None, v: Tensor | None = None) -> bool:
    """The op runs the Triton kernels for CUDA tensors in fp16 / bf16 up to head dim 256 and fp32 up to 128, from
    head dim 16 (those that are not a power of two, e.g. 80 or 96, are zero-padded inside); an ``attn_mask`` must
    reduce to key padding (`key_padding`, checked at run time). Everything else (CPU, fp64, head dims below 16,
    fp32 above 128 — whose backward tiles exceed an H100's shared memory, `scripts/check_kernels_sm90.py` —, other
    masks) runs the reference. ``attn_mask`` is not inspected here."""
    dims = (q.shape[-1],) + ((v.shape[-1],) if v is not None else ())
    if (not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or any(d < 16 or d > max_head_dim(q.dtype) for d in dims)):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_warned_mask = False


_STRICT = threading.local()


@contextlib.contextmanager
def strict_kernels(on: bool = True):
    """Within this context (the backend enters it around each compiled graph of an ``NSAConfig(strict=True)``
    model), a call that would run the reference on CUDA because of its ``attn_mask`` raises `NSAStrictError`
    instead of warning."""
    prev = getattr(_STRICT, "on", False)
    _STRICT.on = on
    try:
        yield
    finally:
        _STRICT.on = prev


def _route(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> tuple[bool, Tensor | None]:
    """(run the Triton kernels?, key validity of ``attn_mask`` for them).

    Raises:
        NSAStrictError: inside `strict_kernels`, when the mask sends a CUDA call to the reference.
    """
    global _warned_mask
    if not use_triton(q, None, v):
        return False, None
    if attn_mask is None:
        return True, None
    key_valid = key_padding(attn_mask, q.shape[0], q.shape[2], k.shape[2])
    if key_valid is None and getattr(_STRICT, "on", False):
        raise NSAStrictError("nsa-compile: an attn_mask that does more than causal key padding (per-head or "
                             "per-query differences, finite biases) would run the NSA reference instead of the "
                             "Triton kernels (NSAConfig.strict)")
    if key_valid is None and not _warned_mask:
        _warned_mask = True
        warnings.warn("nsa-compile: an attn_mask that does more than causal key padding (per-head or per-query "
                      "differences, finite biases) runs the NSA reference, not the Triton kernels: slower and "
                      "O(chunk·T) memory per head", stacklevel=3)
    return key_valid is not None, key_valid


@torch.library.custom_op("nsa_compile::nsa_attention", mutates_args=())
def _nsa_attention(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor, attn_mask: Tensor | None,
                   scale: float, block_size: int, block_stride: int, selection_block_size: int, top_n: int,
                   window_size: int) -> Tensor:
    route, key_valid = _route(q, k, v, attn_mask)
    if route:
        from .nsa_triton import nsa_triton_forward
        check_inputs(q, k, v, gates, video_mask)
        return nsa_triton_forward(q, k, v, gates, video_mask, scale, block_size, block_stride,
                                  selection_block_size, top_n, window_size, key_valid).contiguous()
    return nsa_reference(q, k, v, gates, video_mask, attn_mask, scale, block_size, block_stride,
                         selection_block_size, top_n, window_size)


@_nsa_attention.register_fake
def _(q, k, v, gates, video_mask, attn_mask, scale, block_size, block_stride, selection_block_size, top_n,
      window_size):
    return q.new_empty(q.shape[:3] + (v.shape[-1],))


# Named ``nsa_attention_with_ids`` until its log-sum-exp output became the three branches' ([B, Hq, Tq, 3], was
# [B, Hq, Tq]): a new name, so that graphs Inductor cached with the old output shape are never reused.
@torch.library.custom_op("nsa_compile::nsa_attention_with_state", mutates_args=())
def _nsa_attention_with_state(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor,
                            attn_mask: Tensor | None, scale: float, block_size: int, block_stride: int,
                            selection_block_size: int, top_n: int, window_size: int
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """``nsa_attention`` for training: also returns what its backward reuses instead of recomputing, from the
    Triton path: the top-n block ids int32 [B, Hkv, Tq, top_n] (−1 where none: rows without selection, fewer
    blocks than n, or the reference path, whose backward recomputes; NSA §3.3.2: the choice is not
    differentiated) and the log-sum-exps of the compression, selection and sliding-window branches, fp32
    [B, Hq, Tq, 3] (0 where none)."""
    ids = torch.full((q.shape[0], k.shape[1], q.shape[2], top_n), -1, dtype=torch.int32, device=q.device)
    lse = torch.zeros(q.shape[:3] + (3,), dtype=torch.float32, device=q.device)
    route, key_valid = _route(q, k, v, attn_mask)
    if route:
        from .nsa_triton import nsa_triton_forward
        check_inputs(q, k, v, gates, video_mask)
        out = nsa_triton_forward(q, k, v, gates, video_mask, scale, block_size, block_stride, selection_block_size,
                                 top_n, window_size, key_valid, selected_out=ids, lse_out=lse)
        return out.contiguous(), ids, lse
    return nsa_reference(q, k, v, gates, video_mask, attn_mask, scale, block_size, block_stride,
                         selection_block_size, top_n, window_size), ids, lse


@_nsa_attention_with_state.register_fake
def _(q, k, v, gates, video_mask, attn_mask, scale, block_size, block_stride, selection_block_size, top_n,
      window_size):
    return (q.new_empty(q.shape[:3] + (v.shape[-1],)),
            q.new_empty((q.shape[0], k.shape[1], q.shape[2], top_n), dtype=torch.int32),
            q.new_empty(q.shape[:3] + (3,), dtype=torch.float32))


@torch.library.custom_op("nsa_compile::nsa_attention_backward", mutates_args=())
def _nsa_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor,
                            attn_mask: Tensor | None, scale: float, block_size: int, block_stride: int,
                            selection_block_size: int, top_n: int, window_size: int,
                            selected: Tensor | None = None, lse: Tensor | None = None,
                            out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    route, key_valid = _route(q, k, v, attn_mask)
    if route:
        from .nsa_triton import nsa_triton_backward
        grads = nsa_triton_backward(grad_out, q, k, v, gates, video_mask, scale, block_size, block_stride,
                                    selection_block_size, top_n, window_size, key_valid, selected, lse,
                                    out)
        return tuple(g.contiguous() for g in grads)

    # Recompute-based backward through the reference (torch.func.vjp: autograd is off inside an op's kernel);
    # the top-n block choice is not differentiated (NSA §3.3.2).
    def forward(q_, k_, v_, g_):
        return nsa_reference(q_, k_, v_, g_, video_mask, attn_mask, scale, block_size, block_stride,
                             selection_block_size, top_n, window_size)

    _, vjp = torch.func.vjp(forward, q, k, v, gates)
    return tuple(g.contiguous() for g in vjp(grad_out))


@_nsa_attention_backward.register_fake
def _(grad_out, q, k, v, gates, *args):
    # Gradients are contiguous whatever the inputs' strides (the real implementation returns them so).
    return tuple(x.new_empty(x.shape) for x in (q, k, v, gates))


def _setup_context(ctx, inputs, output):
    q, k, v, gates, video_mask, attn_mask, *params = inputs
    ctx.save_for_backward(q, k, v, gates, video_mask, attn_mask)
    ctx.params = params


def _backward(ctx, grad_out, *forward_state):
    q, k, v, gates, video_mask, attn_mask = ctx.saved_tensors[:6]
    dq, dk, dv, dg = torch.ops.nsa_compile.nsa_attention_backward(grad_out.contiguous(), q, k, v, gates, video_mask,
                                                                  attn_mask, *ctx.params, *forward_state)
    return (dq, dk, dv, dg) + (None,) * 8


_nsa_attention.register_autograd(_backward, setup_context=_setup_context)


def _setup_context_with_state(ctx, inputs, output):
    q, k, v, gates, video_mask, attn_mask, *params = inputs
    out, ids, lse = output
    ctx.save_for_backward(q, k, v, gates, video_mask, attn_mask, ids, lse, out)
    ctx.params = params


def _backward_with_state(ctx, grad_out, _grad_ids, _grad_lse):
    return _backward(ctx, grad_out, *ctx.saved_tensors[6:])


_nsa_attention_with_state.register_autograd(_backward_with_state, setup_context=_setup_context_with_state)


# ``NSAConfig.decode == "sparse"``: the same inputs as nsa_attention (so the rewrite and the export see the same
# schema), plus the kept compressed video state of `decode` (found by fingerprint, never trusted stale).
@torch.library.custom_op("nsa_compile::nsa_attention_sparse_decode", mutates_args=())
def _nsa_attention_sparse_decode(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor,
                                 attn_mask: Tensor | None, scale: float, block_size: int, block_stride: int,
                                 selection_block_size: int, top_n: int, window_size: int) -> Tensor:
    from .decode import sparse_decode_forward
    return sparse_decode_forward(q, k, v, gates, video_mask, attn_mask, scale, block_size, block_stride,
                                 selection_block_size, top_n, window_size).contiguous()


@_nsa_attention_sparse_decode.register_fake
def _(q, k, v, gates, video_mask, attn_mask, scale, block_size, block_stride, selection_block_size, top_n,
      window_size):
    return q.new_empty(q.shape[:3] + (v.shape[-1],))


def _sparse_setup_context(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.extends_cache = inputs[0].shape[2] < inputs[1].shape[2]


def _sparse_backward(ctx, grad_out):
    if ctx.extends_cache:
        raise NSAInputError(
            "nsa-compile: decode='sparse' has no backward for a call that extends a KV cache (its top-n and kept "
            "compressed state are inference-only); train with decode='dense' (the default) or without a cache")
    return _backward(ctx, grad_out)


_nsa_attention_sparse_decode.register_autograd(_sparse_backward, setup_context=_sparse_setup_context)


def nsa_attention(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor, config,
                  attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Call ``torch.ops.nsa_compile.nsa_attention`` (``nsa_attention_with_state`` when autograd records it, so that
    the backward reuses the forward's top-n; ``nsa_attention_sparse_decode`` when ``config.decode`` is
    ``"sparse"``) with the block sizes of an `NSAConfig`.

    Shapes, dtypes and errors as in `nsa_reference`; differentiable in q, k, v and gates (sparse decode: not for
    calls that extend a KV cache).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = (q, k, v, gates, video_mask, attn_mask, scale, config.block_size, config.block_stride,
            config.selection_block_size, config.top_n, config.window_size)
    if getattr(config, "decode", "dense") == "sparse":
        return torch.ops.nsa_compile.nsa_attention_sparse_decode(*args)
    if records_grad(q, k, v, gates):
        return torch.ops.nsa_compile.nsa_attention_with_state(*args)[0]
    return torch.ops.nsa_compile.nsa_attention(*args)


def records_grad(*tensors) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of them requiring grad): the rewrite
    and `nsa_attention` then use ``nsa_attention_with_state``, whose saved top-n ids, branch log-sum-exps and
    output spare the backward a second top-n and let its selection run by key segment (shape A's forward+backward
    at 128K on an H100: 373 → 235 ms; BENCHMARKS.md, sixteenth session)."""
    return torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in tensors)
