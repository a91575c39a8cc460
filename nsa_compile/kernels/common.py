"""What every NSA branch shares: the video-span block layout, a masked softmax attention, input checks and the
attention budget.

Semantics (README "Attention semantics"; every kernel matches them):

* Keys ``j = 0 … Tk−1``; the ``Tq`` queries are the last ``Tq`` positions, query ``i`` sits at ``p = Tk − Tq + i``
  (end-aligned causal attention, as with a KV cache).
* ``video_mask`` ``[B, Tm]`` marks video tokens of the *last* ``Tm`` positions (``Tq ≤ Tm ≤ Tk``); earlier keys
  are text. A *video span* is a maximal run of consecutive video positions. Blocks are counted from the start of
  each span, so a block never mixes text and video, nor two spans.
* Compression blocks start every ``block_stride`` tokens of a span and hold ``block_size`` tokens; only complete
  blocks exist. Selection blocks tile each span in ``selection_block_size`` tokens; the last one may be partial.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
# Rows of queries processed together by the references: bounds their memory to O(QUERY_CHUNK · Tk) per head.
QUERY_CHUNK = 256


class NSAInputError(ValueError):
    """Inputs the NSA op cannot take; the message names the limit and the way out."""


class NSAStrictError(RuntimeError):
    """``NSAConfig(strict=True)``: something would have fallen back to dense attention (or, on CUDA, to the
    reference instead of the Triton kernels); the message names what and why."""


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's launches then split as on a small
    GPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def check_inputs(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor) -> None:
    """Validate shapes, dtypes and devices of the NSA op's inputs.

    Raises:
        NSAInputError: with the offending shape/dtype and what to do instead.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise NSAInputError(
            f"NSA attention takes q, k, v as [batch, heads, tokens, head_dim]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, Hq, Tq, D = q.shape
    _, Hkv, Tk, _ = k.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
        raise NSAInputError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and tokens, and k "
                            f"the batch and head_dim of q {tuple(q.shape)}")
    if Hq % Hkv != 0:
        raise NSAInputError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) (GQA)")
    if Tq > Tk:
        raise NSAInputError(f"more queries ({Tq}) than keys ({Tk}): queries must be the last positions of the keys")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise NSAInputError(f"NSA attention supports {[str(d) for d in SUPPORTED_DTYPES]}; {name} is {t.dtype}. "
                                "Cast the model (e.g. model.to(torch.bfloat16)) or keep this layer dense.")
    if D > MAX_HEAD_DIM:
        raise NSAInputError(f"head_dim {D} exceeds the supported maximum {MAX_HEAD_DIM}; keep this layer dense")
    if gates.shape != (B, Hq, Tq, 3):
        raise NSAInputError(f"gates must be [batch, q_heads, q_tokens, 3] = {(B, Hq, Tq, 3)}, got {tuple(gates.shape)}")
    if video_mask.dim() != 2 or video_mask.shape[0] != B or not (Tq <= video_mask.shape[1] <= Tk):
        raise NSAInputError(
            f"video_mask must be [batch, Tm] with q_tokens ({Tq}) ≤ Tm ≤ k_tokens ({Tk}) marking the last Tm "
            f"positions; got {tuple(video_mask.shape)}. Pass the mask of the tokens of this forward "
            "(nsa_compile.video_mask(...) sets it by hand)."
        )


@dataclass
class VideoLayout:
    """Per-key span and block bookkeeping for one batch of sequences (all tensors on the keys' device).

    Shapes: ``B`` rows, ``Tk`` keys, ``Nc`` compression blocks and ``Ns`` selection blocks (the row maxima; padded
    blocks start at ``Tk`` so that no query ever sees them).
    """

    is_video: Tensor  # [B, Tk] bool
    sel_id: Tensor  # [B, Tk] long: selection block of each video key (0 for text keys)
    sel_start: Tensor  # [B, Tk] long: first key of the selection block holding each video key (Tk for text keys)
    sel_block_start: Tensor  # [B, Ns] long: first key of each selection block
    sel_block_end: Tensor  # [B, Ns] long: last key (inclusive) of each selection block
    cmp_block_start: Tensor  # [B, Nc] long
    cmp_block_end: Tensor  # [B, Nc] long: last key (inclusive)
    block_size: int

    @property
    def num_cmp_blocks(self) -> int:
        return self.cmp_block_start.shape[1]


def _block_table(starts: Tensor, ends: Tensor, Tk: int) -> tuple[Tensor, Tensor, Tensor]:
    """Enumerate the blocks whose first key is marked in ``starts`` [B, Tk] (bool): returns the block id of every
    key marked (cumulative count − 1) and per-row tables of first/last key, padded with (Tk, 2·Tk)."""
    B = starts.shape[0]
    ids = starts.long().cumsum(-1) - 1
    n = int(starts.sum(-1).max().item()) if starts.numel() else 0
    block_start = torch.full((B, max(n, 1)), Tk, dtype=torch.long, device=starts.device)
    block_end = torch.full((B, max(n, 1)), 2 * Tk, dtype=torch.long, device=starts.device)
    rows, cols = starts.nonzero(as_tuple=True)
    block_start[rows, ids[rows, cols]] = cols
    block_end[rows, ids[rows, cols]] = ends[rows, cols]
    return ids, block_start, block_end


def video_layout(video_mask: Tensor, Tk: int, block_size: int, block_stride: int, selection_block_size: int) -> VideoLayout:
    """Spans and blocks of ``video_mask`` ([B, Tm] bool, aligned to the end of ``Tk`` keys; see module doc)."""
    B, Tm = video_mask.shape
    dev = video_mask.device
    is_video = torch.zeros(B, Tk, dtype=torch.bool, device=dev)
    is_video[:, Tk - Tm:] = video_mask.bool()
    pos = torch.arange(Tk, device=dev).expand(B, Tk)
    prev = torch.nn.functional.pad(is_video, (1, 0))[:, :-1]
    nxt = torch.nn.functional.pad(is_video, (0, 1))[:, 1:]
    span_start = torch.where(is_video & ~prev, pos, 0).cummax(-1).values
    span_end = torch.where(is_video & ~nxt, pos, Tk).flip(-1).cummin(-1).values.flip(-1)  # inclusive
    in_span = pos - span_start

    sel_first = is_video & (in_span % selection_block_size == 0)
    sel_last = torch.minimum(pos + selection_block_size - 1, span_end)
    sel_ids, sel_block_start, sel_block_end = _block_table(sel_first, sel_last, Tk)
    sel_id = torch.where(is_video, sel_ids, 0)
    sel_start = torch.where(is_video, span_start + (in_span // selection_block_size) * selection_block_size, Tk)

    cmp_first = is_video & (in_span % block_stride == 0) & (pos + block_size - 1 <= span_end)
    _, cmp_block_start, cmp_block_end = _block_table(cmp_first, pos + block_size - 1, Tk)
    return VideoLayout(is_video, sel_id, sel_start, sel_block_start, sel_block_end, cmp_block_start, cmp_block_end,
                       block_size)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, bias: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """Softmax attention restricted to ``mask``; a row with no allowed key gives zeros (and zero gradients).

    Args:
        q: [B, Hkv, G, C, D]; k, v: [B, Hkv, K, D]; mask: bool, broadcastable to [B, Hkv, G, C, K];
        bias: optional additive float bias broadcastable to the scores (−inf entries act as masked).
    Returns:
        (out [B, Hkv, G, C, D], probabilities [B, Hkv, G, C, K]), in q's dtype.
    """
    s = torch.einsum("bhgcd,bhkd->bhgck", q, k) * scale
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))  # a row that sees nothing: 0, and 0 gradient (not NaN)
    return torch.einsum("bhgck,bhkd->bhgcd", p, v), p


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int, key_filter=None,
                     bias: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """End-aligned causal attention over the last ``window`` positions of each query, optionally restricted further.

    The shared core of the dense (``window ≥ Tk``), selection and sliding-window references, processed in chunks of
    ``QUERY_CHUNK`` queries over only the keys a chunk can see.

    Args:
        q: [B, Hkv, G, Tq, D]; k, v: [B, Hkv, Tk, D] (D of v may differ).
        window: a query at position p sees keys p−window+1 … p.
        key_filter: ``f(i0, i1, lo, hi) -> bool mask`` broadcastable to [B, Hkv, G, i1−i0, hi−lo] for queries
            i0…i1−1 and keys lo…hi−1, further restricting the keys.
        bias: additive bias [B|1, Hkv|1, G|1, Tq, Tk] (see `key_bias`).
        rows: optional bool [B, Tq]; chunks holding no True row are skipped (their output is zero).
    Returns:
        [B, Hkv, G, Tq, Dv]; rows with no visible key are zero.
    """
    B, Hkv, G, Tq, _ = q.shape
    Tk = k.shape[2]
    outs = []
    for i0 in range(0, Tq, QUERY_CHUNK):
        i1 = min(Tq, i0 + QUERY_CHUNK)
        if rows is not None and not bool(rows[:, i0:i1].any()):
            outs.append(q.new_zeros(B, Hkv, G, i1 - i0, v.shape[-1]))
            continue
        p = torch.arange(Tk - Tq + i0, Tk - Tq + i1, device=q.device)
        lo, hi = max(0, Tk - Tq + i0 - window + 1), Tk - Tq + i1
        j = torch.arange(lo, hi, device=q.device)
        mask = (j[None, :] <= p[:, None]) & (j[None, :] > p[:, None] - window)
        if key_filter is not None:
            mask = mask & key_filter(i0, i1, lo, hi)
        b = None if bias is None else bias[..., i0:i1, lo:hi]
        outs.append(masked_attention(q[..., i0:i1, :], k[:, :, lo:hi], v[:, :, lo:hi], mask, scale, b)[0])
    return torch.cat(outs, dim=3)


def key_bias(attn_mask: Tensor | None, B: int, Hkv: int, G: int, Tq: int, Tk: int, dtype: torch.dtype) -> Tensor | None:
    """An SDPA-style ``attn_mask`` (bool: True = attend, or additive float) broadcastable to [B, Hq, Tq, Tk], as an
    additive bias of shape [B|1, Hkv|1, G|1, Tq, Tk] in ``dtype``."""
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(m.shape[0], m.shape[1], Tq, Tk)
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    else:
        m = m.to(dtype)
    if m.shape[1] == 1:
        return m.reshape(m.shape[0], 1, 1, Tq, Tk)
    return m.reshape(m.shape[0], Hkv, G, Tq, Tk)


def attention_budget(video_mask: Tensor, Tk: int, block_size: int, block_stride: int, selection_block_size: int,
                     top_n: int, window_size: int) -> dict[str, float]:
    """Score counts of one prefill: dense causal vs. NSA (text queries dense; video queries compressed blocks +
    selected keys + window), for all queries ``p = Tk−Tm … Tk−1`` of ``video_mask`` [B, Tm].

    Selected keys are counted with full-size blocks, an upper bound that is exact when spans are multiples of the
    selection block size. Returns dense and NSA counts summed over rows, their ratio ``budget`` and the video tokens
    per row.
    """
    lay = video_layout(video_mask, Tk, block_size, block_stride, selection_block_size)
    B, Tm = video_mask.shape
    p = torch.arange(Tk - Tm, Tk, device=video_mask.device)
    vq = lay.is_video[:, Tk - Tm:]  # [B, Tm]
    dense = (p + 1).expand(B, Tm).double()
    n_cmp = (lay.cmp_block_end[:, None, :] <= p[None, :, None]).sum(-1)
    own_start = lay.sel_start[:, Tk - Tm:]
    n_cand = (lay.sel_block_end[:, None, :] < own_start[:, :, None]).sum(-1)
    text_before = torch.cumsum((~lay.is_video).long(), -1)[:, Tk - Tm:]
    n_slc = n_cand.clamp(max=top_n) * selection_block_size + (p - own_start + 1) + text_before
    n_swa = torch.clamp(p + 1, max=window_size)
    nsa = torch.where(vq, (n_cmp + n_slc + n_swa).double(), dense)
    d, n = float(dense.sum()), float(nsa.sum())
    return {"dense_scores": d, "nsa_scores": n, "budget": n / d if d else 1.0,
            "video_tokens": [int(x) for x in video_mask.sum(-1).tolist()]}


def _version(t: Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place change through PyTorch, of it or of a view sharing its
    storage), or None for an inference tensor, which keeps none."""
    try:
        return t._version
    except RuntimeError:
        return None


class MaskCache:
    """Tables derived from a video mask alone, kept for the last ``keep`` masks, so that the layers of a forward (and
    its backward), which share one mask, build them once (a build costs several host syncs).

    A lookup finds an entry without a host sync when it is given **the same tensor** the entry last matched,
    unchanged since (its version counter: any in-place change through PyTorch bumps it, also through a view). Else
    it compares contents with the entry's copy of the mask (one host sync; also for inference tensors, which keep no
    version counter), so a mask changed in place, or a new mask at a reused address, is never matched. The entry
    holds a reference to the tensor it last matched (no reuse of its address while kept). The sync-free path cut
    shape A's forward at 16K from 7.3 to 6.1 ms and its forward+backward from 20.5 to 17.8 ms on an H100 (the sync
    had left the GPU idle while the host queued the next launches; BENCHMARKS.md, twenty-second session). Changes
    made outside PyTorch's ops (through DLPack or a NumPy view) are not seen: pass a new tensor then.
    Thread-safe."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._entries: list[list] = []  # [key, copy of the mask, value, last tensor matched, its version]
        self._lock = threading.Lock()

    def get(self, mask: Tensor, key: tuple, build):
        """The value of ``build()`` for ``mask`` and ``key`` (the other inputs ``build`` depends on), built only
        when no kept entry has the same key and a mask equal to ``mask``."""
        key = (tuple(mask.shape), mask.dtype, mask.device) + tuple(key)
        version = _version(mask)
        with self._lock:
            for entry in self._entries:
                if entry[0] == key and version is not None and entry[3] is mask and entry[4] == version:
                    return entry[2]
            for entry in self._entries:
                if entry[0] == key and torch.equal(entry[1], mask):
                    entry[3:] = [mask, version]
                    return entry[2]
        with torch.inference_mode(False):  # kept tensors are normal ones, usable by autograd-tracked calls later
            value, copy = build(), mask.clone()
        with self._lock:
            self._entries.insert(0, [key, copy, value, mask, version])
            del self._entries[self.keep:]
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
