"""Sparse decode (``NSAConfig.decode = "sparse"``): a text query in a call that extends a KV cache (a decode step, a
text continuation after a cached video) attends the cached video through the NSA branches (NSA arXiv 2502.11089
§3.3: compression, top-n selection, sliding window; VideoNSA arXiv 2510.02295 §3 for mean-pooled compression and the
text/video split) instead of reading the whole cache. Semantics: `nsa.nsa_reference` with ``decode="sparse"`` (the
oracle) and README "Attention semantics".

**Kept compressed K/V (the state).** A decode step must not read the whole cache, so the compressed video keys and
values of each layer are computed once, when the video blocks complete (in practice at the prefill that holds the
video), and kept in a `DecodeState` together with the sequence's video mask, the block tables the kernels need and
a *fingerprint* of the keys/values it was built from (compressed keys in fp32: their logits rank the blocks, and
bf16-rounded means would swap near-tied blocks against the reference). States live in one process-wide store
(`STATES`), keyed by device, dtypes, shapes and block sizes. The op has no layer argument (its schema is the one of
``nsa_compile::nsa_attention``), so a call finds its state **by content**: the cache of a layer starts with exactly the
keys/values the state was built from, so the state whose fingerprint (a bit-exact copy of K and V at ``PROBES``
evenly spaced positions of its ``anchor`` keys, last one included) equals the same positions of the call's K/V is
that layer's (layer 0's keys depend on their own token only, so two caches equal at every probe but different
elsewhere would match there; a prefill of such a cache through the op replaces the state, as identical
fingerprints are deduplicated). Never stale:

* a state is used only if its fingerprint matches bit for bit (one small gather + compare and a single host sync
  per call), its key (device, dtypes, batch, heads, head dims, block sizes) matches and it covers no more keys
  than the call has; for layers after the first, the key at the last anchored position depends on every earlier
  token through attention, so any change of the cached prefix changes it;
* where the call's video mask overlaps the state's keys, the two masks must agree, else the state is rebuilt from
  the call's keys (``stale``);
* a call bringing video at keys the state has not seen (new blocks) rebuilds the state from its keys over the whole
  sequence mask (one read of the cache, once), replacing the old one;
* several matching states with one mask: rebuilt from the keys; with different masks: nothing is trusted, the
  cached keys count as text (dense) and a warning says so; no matching state at all: the same, with a warning when
  states of that kind exist (e.g. the prefill ran outside the op, or the state was evicted).

Cached tokens the state never saw (earlier decode steps) are text. The store is bounded (``STATES.max_bytes``,
LRU; evictions warn) and emptied by `clear_decode_states` (``nsa_compile.kernels.decode.clear_decode_states``).

**GPU path** (CUDA, fp16 / bf16 / fp32, power-of-two head dims 16–256, fp32 up to 128, no ``attn_mask``): three
Triton launches, no host sync, CUDA-graph capturable (`sparse_decode_triton`):

1. ``_dec_cmp_kernel`` — grid (B·Hkv·Tq, S1): each program takes the G query heads of one GQA group at one query
   position (rows padded to ≥ 16 for ``tl.dot``) and a slice of the compressed blocks: logits (kept in a scratch
   buffer for scoring, but by the spread selection) and an online-softmax partial of the compression branch
   (split-K). The last of a row's S1 programs to finish (a ticket per row: ``tl.atomic_add`` with acquire-release
   semantics after a block barrier, the partials then read through L2) runs the row's selection (`_select_row`):
   it merges the S1 partial log-sum-exps, scores *all* selection blocks (group-summed compression probabilities of
   the compressed blocks overlapping each, NSA eq. 9-10) and takes the top-n by one bitonic ``tl.topk`` over
   unique int32 keys (the score's bits at the reference's resolution, then the reversed block id: ties go to the
   earlier block exactly as `selection.select_block_ids`), writing the chosen block ids (−1 padded). Where
   blocks and selection blocks coincide (``videonsa``), each program holds one tile, a row has at least
   `SPREAD_MIN_TILES` and the grid fits the SMs (a 64K–128K cache at batch 1), the selection is spread instead
   (`_select_spread`): every program waits for the row's partials (a spin on the row's ticket), scores its own
   tile (its logits still in registers) and keeps its top-n keys; the last one takes the top-n of those.
2. ``_dec_attn_kernel`` — grid (B·Hkv·Tq, S2): the work items of a row (chosen blocks by rank, then the text keys
   — tables of ≤ BLOCK_N-token chunks up to the anchor, then the tail of decoded tokens — then the window's
   chunks) are numbered in that order and program j takes items j, j+S2, …; it writes online-softmax partials of
   the selection and window branches.
3. ``_dec_combine_kernel`` — grid (B·Hkv·Tq, G): merges the partials of the three branches and applies the gates;
   a text query with no video before it gets the selection branch alone, which is then exact dense attention.

Elsewhere (CPU, ``attn_mask``, odd head dims) the op runs `nsa_reference(..., decode="sparse")` with the sequence
mask the state provides. Sparse decode has no backward: differentiating through a call that extends a KV cache
with ``decode="sparse"`` raises `NSAInputError`.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from .common import MaskCache, NSAInputError, check_inputs, sm_count, video_layout

try:  # the reference's tie rule: scores equal in their top 31 − key_id_bits(Ns) bits tie (earlier block wins)
    from .selection import key_id_bits
except ImportError:  # pragma: no cover - a reference ranking by the full fp32 score
    def key_id_bits(num_blocks: int) -> int:
        return 0

try:  # Triton is optional: without it every call runs the reference
    import triton
    import triton.language as tl
    HAS_TRITON = True
    try:  # programmatic dependent launch (Hopper and later; triton ≥ 3.4)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        HAS_PDL = True
    except ImportError:  # pragma: no cover
        HAS_PDL = False
except ImportError:  # pragma: no cover - triton ships with CUDA torch and is installed for the tests
    HAS_TRITON = False

INT32_MAX = 2**31 - 1
# Positions of the fingerprint (evenly spaced over a state's anchored keys, first and last included).
PROBES = 64
# Tests set this to run the Triton decode path on CPU tensors under TRITON_INTERPRET=1.
INTERPRET_ON_CPU = False
# Bytes of logits scratch one launch may use; longer text continuations are processed in query chunks.
_SCRATCH_BYTES = 64 << 20


# ------------------------------------------------------------------------------------------------ the state
@dataclass(eq=False)
class DecodeState:
    """Kept compressed K/V and block tables of one layer's cached sequence (all tensors on the cache's device).

    ``anchor`` keys (positions 0 … anchor−1) were seen when it was built; ``NC``/``NS``/``NT`` are row maxima
    (padding entries are never visible: ends ``INT32_MAX``, empty chunks).
    """

    key: tuple  # (device, k dtype, v dtype, B, Hkv, D, Dv, block_size, block_stride, selection_block_size)
    anchor: int
    video_mask: Tensor  # bool [B, anchor]
    probe_pos: Tensor  # long [P]
    probe_k: Tensor  # [B, Hkv, P, D] bit-exact copy of k at probe_pos
    probe_v: Tensor  # [B, Hkv, P, Dv]
    k_cmp: Tensor  # [B, Hkv, NC, D] mean-pooled compression blocks, fp32 (fp64 for fp64 keys)
    v_cmp: Tensor  # [B, Hkv, NC, Dv], v's dtype
    cmp_end: Tensor  # int32 [B, NC]: last key of each compressed block (inclusive)
    sel_start: Tensor  # int32 [B, NS]: first key of each selection block
    sel_end: Tensor  # int32 [B, NS]: last key (inclusive)
    band_first: Tensor  # int32 [B, NS]: first compressed block overlapping each selection block
    band_last: Tensor  # int32 [B, NS]: one past the last
    band_width: int  # max(band_last − band_first)
    blocks_coincide: bool  # every selection block's band is the one compressed block of its index (e.g. videonsa)
    txt_start: Tensor  # int32 [B, NT]: text keys before the anchor in chunks of ≤ block_n tokens
    txt_end: Tensor  # int32 [B, NT] (exclusive)
    n_txt: Tensor  # int32 [B]
    first_video: Tensor  # int32 [B]: first video position (INT32_MAX: none)
    block_n: int  # key tile of the attention kernel (power of two ≥ 16)
    cmp_blocks: tuple[int, ...]  # compressed blocks per row
    sel_blocks: tuple[int, ...]  # selection blocks per row

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.video_mask, self.probe_pos, self.probe_k, self.probe_v, self.k_cmp, self.v_cmp, self.cmp_end,
            self.sel_start, self.sel_end, self.band_first, self.band_last, self.txt_start, self.txt_end))


def state_key(k: Tensor, v: Tensor, block_size: int, block_stride: int, selection_block_size: int) -> tuple:
    """What a state must share with a call to be considered for it (the fingerprint decides among those)."""
    B, Hkv, _, D = k.shape
    return (k.device, k.dtype, v.dtype, B, Hkv, D, v.shape[-1], block_size, block_stride, selection_block_size)


def _pow2(n: int, lo: int = 1) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def _bits(t: Tensor) -> Tensor:
    """``t`` reinterpreted as integers of its width: equality of bits (NaN equals itself, −0 ≠ +0)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _pool(x: Tensor, starts: Tensor, block: int, dtype: torch.dtype) -> Tensor:
    """Mean of ``x`` [B, H, T, D] over the blocks of ``block`` keys starting at ``starts`` [B, N] (padding
    entries ≥ T give the mean of the first keys, never visible); fp32 accumulation, returned in ``dtype``; in
    chunks of blocks so the gathered copy stays small."""
    B, H, T, D = x.shape
    N = starts.shape[1]
    out = x.new_empty(B, H, N, D, dtype=dtype)
    chunk = max(1, (32 << 20) // max(1, B * H * block * D * 4))
    ar = torch.arange(block, device=x.device)
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        idx = starts[:, c0:c1, None] + ar
        idx = torch.where(idx < T, idx, 0).reshape(B, 1, -1, 1).expand(B, H, -1, D)
        g = x.gather(2, idx).reshape(B, H, c1 - c0, block, D)
        out[:, :, c0:c1] = g.to(torch.promote_types(x.dtype, torch.float32)).mean(3).to(dtype)
    return out


def _i32(t: Tensor, valid: Tensor, pad: int) -> Tensor:
    return torch.where(valid, t, pad).clamp(max=INT32_MAX).to(torch.int32).contiguous()


@dataclass(eq=False)
class _StateTables:
    """The part of a `DecodeState` that depends on the video mask alone (the same for every layer)."""

    video_mask: Tensor
    cmp_block_start: Tensor  # long [B, NC] (for the pooling)
    cmp_end: Tensor
    sel_start: Tensor
    sel_end: Tensor
    band_first: Tensor
    band_last: Tensor
    band_width: int
    blocks_coincide: bool
    txt_start: Tensor
    txt_end: Tensor
    n_txt: Tensor
    first_video: Tensor
    probe_pos: Tensor
    block_n: int
    cmp_blocks: tuple[int, ...]
    sel_blocks: tuple[int, ...]


# Shared by the layers of a prefill: the first builds the tables (~10 host syncs), the others find them by content.
_STATE_TABLES = MaskCache()


def _state_tables(M: Tensor, block_size: int, block_stride: int, selection_block_size: int) -> _StateTables:
    B, T = M.shape
    dev = M.device
    lay = video_layout(M, T, block_size, block_stride, selection_block_size)
    cmp_ok = lay.cmp_block_start < T
    sel_ok = lay.sel_block_start < T

    # Compressed blocks overlapping each selection block: a contiguous band (blocks are in position order).
    first = torch.searchsorted(lay.cmp_block_end.contiguous(), lay.sel_block_start.contiguous())
    last = torch.searchsorted(lay.cmp_block_start.contiguous(), lay.sel_block_end.contiguous(), right=True)
    last = torch.where(sel_ok, torch.minimum(last, cmp_ok.sum(-1, keepdim=True)), first)
    band_width = max(1, int((last - first).max())) if last.numel() else 1
    j = torch.arange(first.shape[1], device=dev)
    blocks_coincide = bool((~sel_ok | ((last - first == 1) & (first == j))).all())

    # Text keys before the anchor, in chunks of at most block_n tokens that never cross a video token.
    block_n = min(128, _pow2(selection_block_size, 16))
    text = ~M
    pos = torch.arange(T, device=dev).expand(B, T)
    prev = torch.nn.functional.pad(text, (1, 0))[:, :-1]
    nxt = torch.nn.functional.pad(text, (0, 1))[:, 1:]
    run_start = torch.where(text & ~prev, pos, 0).cummax(-1).values
    run_end = torch.where(text & ~nxt, pos, T).flip(-1).cummin(-1).values.flip(-1)  # inclusive
    chunk_first = text & ((pos - run_start) % block_n == 0)
    n_txt = chunk_first.sum(-1)
    NT = max(1, int(n_txt.max()))
    rows, cols = chunk_first.nonzero(as_tuple=True)
    idx = chunk_first.long().cumsum(-1)[rows, cols] - 1
    txt_start = torch.zeros(B, NT, dtype=torch.long, device=dev)
    txt_end = torch.zeros(B, NT, dtype=torch.long, device=dev)
    txt_start[rows, idx] = cols
    txt_end[rows, idx] = torch.minimum(cols + block_n, run_end[rows, cols] + 1)

    has_video = M.any(-1)
    first_video = torch.where(has_video, M.long().argmax(-1), INT32_MAX)
    return _StateTables(
        video_mask=M, cmp_block_start=lay.cmp_block_start, cmp_end=_i32(lay.cmp_block_end, cmp_ok, INT32_MAX),
        sel_start=_i32(lay.sel_block_start, sel_ok, INT32_MAX), sel_end=_i32(lay.sel_block_end, sel_ok, INT32_MAX),
        band_first=_i32(first, sel_ok, 0), band_last=_i32(last, sel_ok, 0), band_width=band_width,
        blocks_coincide=blocks_coincide,
        txt_start=txt_start.to(torch.int32).contiguous(), txt_end=txt_end.to(torch.int32).contiguous(),
        n_txt=n_txt.to(torch.int32).contiguous(), first_video=first_video.to(torch.int32).contiguous(),
        probe_pos=torch.linspace(0, T - 1, min(PROBES, T), device=dev).round().long().unique(), block_n=block_n,
        cmp_blocks=tuple(cmp_ok.sum(-1).tolist()), sel_blocks=tuple(sel_ok.sum(-1).tolist()))


def build_decode_state(k: Tensor, v: Tensor, video_mask: Tensor, block_size: int, block_stride: int,
                       selection_block_size: int) -> DecodeState:
    """Compress and index the video of a cached sequence for sparse decode.

    Args:
        k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv] (the layer's whole cache, fp16 / bf16 / fp32 / fp64);
        video_mask: bool [B, T] over *all* T positions (not only the last call's tokens);
        block_size, block_stride, selection_block_size: `NSAConfig` fields (tokens).
    Returns:
        a `DecodeState` anchored at T. Costs one read of the video keys/values (the pooling); its mask's tables
        (a few host syncs) are built once for the layers of a prefill, which share the mask (`MaskCache`).
    Raises:
        NSAInputError: a mask that does not cover the T positions.
    """
    B, Hkv, T, D = k.shape
    if video_mask.shape != (B, T):
        raise NSAInputError(f"build_decode_state needs the video mask of all {T} cached positions, [B, T] = "
                            f"{(B, T)}; got {tuple(video_mask.shape)}")
    M = video_mask.to(k.device).bool().contiguous()
    t = _STATE_TABLES.get(M, (block_size, block_stride, selection_block_size),
                          lambda: _state_tables(M.clone(), block_size, block_stride, selection_block_size))
    # Compressed keys in fp32 (at least): their logits decide the top-n, and bf16 rounding of the means would move
    # scores by ~0.1 %, enough to swap blocks near the n-th against the reference. Values keep the cache's dtype.
    k_cmp = _pool(k, t.cmp_block_start, block_size, torch.promote_types(k.dtype, torch.float32))
    v_cmp = _pool(v, t.cmp_block_start, block_size, v.dtype)
    return DecodeState(
        key=state_key(k, v, block_size, block_stride, selection_block_size), anchor=T, video_mask=t.video_mask,
        probe_pos=t.probe_pos, probe_k=k.index_select(2, t.probe_pos), probe_v=v.index_select(2, t.probe_pos),
        k_cmp=k_cmp.contiguous(), v_cmp=v_cmp.contiguous(), cmp_end=t.cmp_end, sel_start=t.sel_start,
        sel_end=t.sel_end, band_first=t.band_first, band_last=t.band_last, band_width=t.band_width,
        blocks_coincide=t.blocks_coincide,
        txt_start=t.txt_start, txt_end=t.txt_end, n_txt=t.n_txt, first_video=t.first_video, block_n=t.block_n,
        cmp_blocks=t.cmp_blocks, sel_blocks=t.sel_blocks)


class _Group:
    """States of one key and one anchor: they share probe positions, so one gather serves all of them."""

    def __init__(self, pos: Tensor):
        self.pos = pos
        self.states: list[DecodeState] = []
        self._stacked: tuple[Tensor, Tensor] | None = None

    def stacked(self) -> tuple[Tensor, Tensor]:
        if self._stacked is None:
            self._stacked = (torch.stack([_bits(s.probe_k) for s in self.states]),
                             torch.stack([_bits(s.probe_v) for s in self.states]))
        return self._stacked

    def matches(self, k: Tensor, v: Tensor) -> Tensor:
        """bool [len(states)]: which states' fingerprints equal ``k``/``v`` at the probe positions (on device)."""
        return self.matches_probes(k.index_select(2, self.pos), v.index_select(2, self.pos))

    def matches_probes(self, pk: Tensor, pv: Tensor) -> Tensor:
        sk, sv = self.stacked()
        return (sk == _bits(pk)).flatten(1).all(1) & (sv == _bits(pv)).flatten(1).all(1)


class DecodeStates:
    """The process-wide store of `DecodeState` s: found by fingerprint, LRU-bounded.

    Attributes:
        max_bytes: total size kept (default 2 GiB, or ``NSA_DECODE_STATE_MAX_BYTES``); older states are evicted
            (with a warning: a later decode over an evicted state's cache treats its video as text).
        stats: counters ``builds``, ``hits``, ``misses``, ``rebuilds``, ``ambiguous``, ``evictions``.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = int(os.environ.get("NSA_DECODE_STATE_MAX_BYTES", 2 << 30)) if max_bytes is None else max_bytes
        self._lock = threading.RLock()
        self._lru: OrderedDict[int, DecodeState] = OrderedDict()
        self._groups: dict[tuple, dict[int, _Group]] = {}
        self.stats = dict.fromkeys(("builds", "hits", "misses", "rebuilds", "ambiguous", "evictions"), 0)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._lru.values())

    def clear(self) -> None:
        """Drop every state and zero the counters."""
        with self._lock:
            self._lru.clear()
            self._groups.clear()
            self.stats = dict.fromkeys(self.stats, 0)

    def has_key(self, key: tuple) -> bool:
        return bool(self._groups.get(key))

    def _remove(self, state: DecodeState) -> None:
        self._lru.pop(id(state), None)
        groups = self._groups.get(state.key, {})
        grp = groups.get(state.anchor)
        if grp is not None and state in grp.states:
            grp.states.remove(state)
            grp._stacked = None
            if not grp.states:
                del groups[state.anchor]

    def put(self, state: DecodeState, replace: tuple[DecodeState, ...] = ()) -> None:
        """Keep ``state``, dropping ``replace`` and any state of the same key and anchor with the same fingerprint
        (the same layer's prefill run again), then evict the least recently used beyond ``max_bytes``."""
        with self._lock:
            for old in replace:
                self._remove(old)
            groups = self._groups.setdefault(state.key, {})
            grp = groups.get(state.anchor)
            if grp is not None and grp.states:
                same = grp.matches_probes(state.probe_k, state.probe_v).tolist()
                for old, s in zip(list(grp.states), same):
                    if s:
                        self._remove(old)
                grp = groups.get(state.anchor)
            if grp is None:
                grp = groups[state.anchor] = _Group(state.probe_pos)
            grp.states.append(state)
            grp._stacked = None
            self._lru[id(state)] = state
            self.stats["builds"] += 1
            total = self.nbytes
            while total > self.max_bytes and len(self._lru) > 1:
                old = next(iter(self._lru.values()))
                total -= old.nbytes
                self._remove(old)
                self.stats["evictions"] += 1
                warnings.warn("nsa-compile sparse decode: evicted a kept video state (store over "
                              f"{self.max_bytes / 2**30:.1f} GiB); a decode over that cache treats its video as text. "
                              "Raise nsa_compile.kernels.decode.STATES.max_bytes or call clear_decode_states() "
                              "between sequences.", stacklevel=3)

    def lookup(self, k: Tensor, v: Tensor, key: tuple, extra: Tensor | None = None
               ) -> tuple[list[DecodeState], int, list[int]]:
        """States whose fingerprint matches ``k``/``v`` (anchors ≤ the call's keys), the number of states
        considered, and the values of ``extra`` (an integer tensor on the same device), all in one host sync."""
        with self._lock:
            Tk = k.shape[2]
            groups = [g for a, g in self._groups.get(key, {}).items() if a <= Tk and g.states]
            checks = [g.matches(k, v) for g in groups]
            owners = [s for g in groups for s in g.states]
            n_extra = 0 if extra is None else extra.numel()
            parts = [c.long() for c in checks] + ([extra.reshape(-1).long()] if extra is not None else [])
            vals = torch.cat(parts).tolist() if parts else []
            hits = [s for s, ok in zip(owners, vals[:len(owners)]) if ok]
            for s in hits:
                self._lru.move_to_end(id(s))
            self.stats["hits" if hits else "misses"] += 1
            return hits, len(owners), vals[len(owners):len(owners) + n_extra]


STATES = DecodeStates()


def clear_decode_states() -> None:
    """Drop every kept compressed video state (frees their GPU memory); the next decode over an existing cache
    then treats its video as text, so call it between sequences, not in the middle of one."""
    STATES.clear()
    _STATE_TABLES.clear()


# ------------------------------------------------------------------------------------------------ the op body
def use_decode_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> bool:
    """The Triton decode kernels take CUDA tensors (or CPU ones under the interpreter when `INTERPRET_ON_CPU`) in
    fp16 / bf16 / fp32 with one dtype, power-of-two head dims 16–256 (fp32: up to 128, shared memory) and no
    ``attn_mask``."""
    if not HAS_TRITON or attn_mask is not None:
        return False
    if not (q.is_cuda or (INTERPRET_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    top = 128 if q.dtype == torch.float32 else 256
    return all(16 <= d <= top and d & (d - 1) == 0 for d in (q.shape[-1], v.shape[-1]))


_warned: set[str] = set()


def _warn_once(kind: str, msg: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(msg, stacklevel=4)


def sparse_decode_forward(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor,
                          attn_mask: Tensor | None, scale: float, block_size: int, block_stride: int,
                          selection_block_size: int, top_n: int, window_size: int) -> Tensor:
    """Body of ``nsa_compile::nsa_attention_sparse_decode``: `nsa_reference` semantics with ``decode="sparse"``.

    A prefill call (Tq == Tk) runs ``nsa_compile::nsa_attention`` and, when it holds video, keeps the layer's
    `DecodeState`. A call that extends a cache finds its state by fingerprint (module doc), builds the sequence
    mask (the state's video mask, text for positions it never saw, the call's own mask for its tokens) and runs the
    Triton decode kernels for its text queries (the reference where they do not apply).

    Shapes, dtypes and errors as `nsa_reference`. Returns [B, Hq, Tq, Dv] in q's dtype.
    """
    check_inputs(q, k, v, gates, video_mask)
    B, Hq, Tq, _ = q.shape
    Tk, Tm = k.shape[2], video_mask.shape[1]
    params = (scale, block_size, block_stride, selection_block_size, top_n, window_size)
    vm = video_mask.to(k.device).bool()

    def base(mask: Tensor) -> Tensor:
        return torch.ops.nsa_compile.nsa_attention.default(q, k, v, gates, mask, attn_mask, *params)

    if Tq == Tk:
        out = base(vm)
        if bool(vm.any()):
            STATES.put(build_decode_state(k, v, vm, block_size, block_stride, selection_block_size))
        return out

    key = state_key(k, v, block_size, block_stride, selection_block_size)
    last_video = torch.where(vm, torch.arange(Tm, device=vm.device), -1).amax().reshape(1)
    hits, considered, (last_video,) = STATES.lookup(k, v, key, extra=last_video)
    state = hits[0] if len(hits) == 1 else None
    stale = False
    if len(hits) > 1:
        STATES.stats["ambiguous"] += 1
        if all(torch.equal(h.video_mask, hits[0].video_mask) for h in hits[1:]) and \
                len({h.anchor for h in hits}) == 1:
            state, stale = hits[0], True  # one mask: rebuild the compressed K/V from the call's keys
        else:
            _warn_once("ambiguous", "nsa-compile sparse decode: several kept video states match this KV cache with "
                       "different video masks; its video counts as text (dense attention) for this call. Call "
                       "nsa_compile.kernels.decode.clear_decode_states() between unrelated sequences.")
    lo = Tk - Tm  # first position of the call's own mask
    # video among the keys the state has not seen (all the call's video when there is no state): new blocks
    new_video = last_video >= 0 and (state is None or lo + last_video >= state.anchor)
    if state is not None and lo < state.anchor and \
            not torch.equal(state.video_mask[:, lo:], vm[:, :state.anchor - lo]):
        stale = True  # the call says otherwise about keys the state covers: the call wins

    def sequence_mask() -> Tensor:
        """[B, Tk]: the state's video mask, text where nothing was recorded, the call's mask over its tokens."""
        M = torch.zeros(B, Tk, dtype=torch.bool, device=k.device)
        if state is not None:
            M[:, :state.anchor] = state.video_mask
        M[:, lo:] = vm
        return M

    M = None
    if new_video or stale:
        M = sequence_mask()
        state = build_decode_state(k, v, M, block_size, block_stride, selection_block_size)
        STATES.put(state, replace=tuple(hits))
        STATES.stats["rebuilds"] += 1
    if state is None:
        if considered:
            _warn_once("miss", "nsa-compile sparse decode: no kept video state matches this KV cache (its prefill "
                       "did not run through the NSA op with decode='sparse', the cache was changed, or the state "
                       "was evicted): its cached keys count as text, so text queries attend densely.")
        return base(vm)

    if use_decode_triton(q, k, v, attn_mask):
        out = sparse_decode_triton(q, k, v, gates, state, scale, top_n, window_size)
        if last_video >= Tm - Tq:  # video queries in this call: the prefill path over the whole sequence mask
            M = sequence_mask() if M is None else M
            out = torch.where(M[:, Tk - Tq:][:, None, :, None], base(M), out)
        return out
    from .nsa import nsa_reference
    return nsa_reference(q, k, v, gates, sequence_mask() if M is None else M, attn_mask, scale, block_size,
                         block_stride, selection_block_size, top_n, window_size, decode="sparse")


def sparse_decode_reference(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, state: DecodeState, scale: float,
                            top_n: int, window_size: int) -> Tensor:
    """What `sparse_decode_triton` computes, in plain PyTorch: `nsa_reference` with ``decode="sparse"`` over the
    state's video mask (text after its anchor), for the Tq text queries at the end of ``k`` [B, Hkv, Tk, D]."""
    from .nsa import nsa_reference
    B, Tk = k.shape[0], k.shape[2]
    M = torch.zeros(B, Tk, dtype=torch.bool, device=k.device)
    M[:, :state.anchor] = state.video_mask
    _, _, _, _, _, _, _, l, d, ls = state.key
    return nsa_reference(q, k, v, gates, M, None, scale, l, d, ls, top_n, window_size, decode="sparse")


# ------------------------------------------------------------------------------------------------ Triton kernels
if HAS_TRITON:

    @triton.jit
    def _attend_chunk(q, kb, vb, skt, svt, keys, kok, m, l, acc, scale, d, dv, PRECISION: tl.constexpr):
        """One online-softmax step of the G rows over the keys ``keys`` where ``kok``."""
        kk = tl.load(kb + keys.to(tl.int64)[:, None] * skt + d[None, :], mask=kok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kk), input_precision=PRECISION) * scale
        s = tl.where(kok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        vv = tl.load(vb + keys.to(tl.int64)[:, None] * svt + dv[None, :], mask=kok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(e.to(vv.dtype), vv, input_precision=PRECISION)
        return m_new, l * alpha + tl.sum(e, 1), acc

    @triton.jit
    def _row_query(Q, pid, TQ, sqb, sqh, sqt, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                   D: tl.constexpr):
        """(t, b, hkv, q) of query row ``pid`` (= (b·HKV + hkv)·TQ + t): its position in the call, batch, KV head,
        and the [GP, D] queries of the group's G heads at t (rows ≥ G zero), in q's dtype."""
        t = pid % TQ
        b = pid // TQ // HKV
        hkv = pid // TQ % HKV
        g = tl.arange(0, GP)
        h = hkv * G + g
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + t.to(tl.int64) * sqt
                    + tl.arange(0, D)[None, :], mask=(g < G)[:, None], other=0.0)
        return t, b, hkv, q

    @triton.jit
    def _row_lse(M1, L1, pid, S1, GP: tl.constexpr, S1P: tl.constexpr):
        """fp32 [GP]: each head's log-sum-exp of query row ``pid``'s compression softmax, from its S1 partials
        (m, l) (written by other programs: read through L2); +inf where nothing was visible."""
        g = tl.arange(0, GP)
        sp = tl.arange(0, S1P)
        o1 = (pid * S1 + sp[None, :]).to(tl.int64) * GP + g[:, None]
        ms = tl.load(M1 + o1, mask=sp[None, :] < S1, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(L1 + o1, mask=sp[None, :] < S1, other=0.0, cache_modifier=".cg")
        mx = tl.max(ms, 1)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        tot = tl.sum(ls * tl.exp(ms - mx_safe[:, None]), 1)
        return tl.where(tot > 0, mx_safe + tl.log(tl.where(tot > 0, tot, 1.0)), float("inf"))

    @triton.jit
    def _select_row(S, M1, L1, LSE, SEND, BFIRST, BLAST, SEL, pid, TQ, p0, NC, NS, S1, top_n, n_sel_max,
                    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, S1P: tl.constexpr, NS_PAD: tl.constexpr,
                    W_BAND: tl.constexpr, IDB: tl.constexpr, TOP_K: tl.constexpr):
        """Block scores and the top-n of query row ``pid`` (= (b·HKV + hkv)·TQ + t), from the compression kernel's
        logits S and S1 partials (read through L2: other programs wrote them), written to SEL (−1 padded)."""
        t = pid % TQ
        b = pid // TQ // HKV
        p = p0 + t
        g = tl.arange(0, GP)

        # 1. log-sum-exp of each row's compression softmax, from the S1 partials; through the LSE scratch so that
        #    each head's value is then a scalar load (no reduction per head below).
        tl.store(LSE + pid * GP + g, _row_lse(M1, L1, pid, S1, GP, S1P))
        tl.debug_barrier()

        # 2. score of every selection block: Σ over the group's heads and the overlapping compressed blocks (NSA
        #    eqs. 9-10).
        sb = tl.arange(0, NS_PAD)
        sok = sb < NS
        rowb = b.to(tl.int64) * NS
        first = tl.load(BFIRST + rowb + sb, mask=sok, other=0)
        last = tl.load(BLAST + rowb + sb, mask=sok, other=0)
        send = tl.load(SEND + rowb + sb, mask=sok, other=2147483647)
        score = tl.zeros([NS_PAD], tl.float32)
        for i in range(0, W_BAND):  # one iteration when blocks and selection blocks coincide (videonsa)
            c = first + i
            ok = sok & (c < last)
            for gg in tl.static_range(G):  # inside the loop, so that the G heads' loads are in flight together
                lse_g = tl.load(LSE + pid * GP + gg, cache_modifier=".cg")
                sv = tl.load(S + (pid * GP + gg).to(tl.int64) * NC + c, mask=ok, other=float("-inf"),
                             cache_modifier=".cg")
                score += tl.exp(sv - lse_g)

        # 3. top-n of the candidates (blocks ending at or before p) by one bitonic top-K of unique int32 keys
        #    (`_block_keys`, IDB = key_id_bits(NS)), the order of selection.select_block_ids.
        top = tl.topk(_block_keys(score, sb, sok & (send <= p), IDB), TOP_K)  # descending
        r = tl.arange(0, TOP_K)
        tl.store(SEL + pid.to(tl.int64) * n_sel_max + r, _block_ids(top, r, top_n, IDB), mask=r < n_sel_max)

    @triton.jit
    def _block_keys(score, blk, ok, IDB: tl.constexpr):
        """int32 top-n keys, unique per block: the score's float bits above IDB (lower bits count as tied), the
        reversed block id below (of tied scores the earlier block wins, as `selection.select_block_ids`); −1 where
        not ``ok`` (no candidate)."""
        low = (1 << IDB) - 1
        return tl.where(ok, ((score.to(tl.int32, bitcast=True) >> IDB) << IDB) + (low - blk), -1)

    @triton.jit
    def _block_ids(top, r, top_n, IDB: tl.constexpr):
        """Block ids of the descending keys ``top`` (`_block_keys`), −1 past rank ``top_n`` or for no candidate."""
        low = (1 << IDB) - 1
        return tl.where((top >= 0) & (r < top_n), low - (top & low), -1)

    @triton.jit
    def _arrive(CNT, pid):
        """Count this program in at its row's counter (after all its threads' stores, which the count releases);
        returns the count before."""
        tl.debug_barrier()
        return tl.atomic_add(CNT + pid, 1, sem="acq_rel")

    @triton.jit
    def _wait_for(CNT, pid, target):
        """Spin until the row's counter reaches ``target`` (acquiring what the programs counted in wrote)."""
        n = tl.atomic_add(CNT + pid, 0, sem="acquire")
        while n < target:
            n = tl.atomic_add(CNT + pid, 0, sem="acquire")

    @triton.jit
    def _select_spread(s, M1, L1, SEND, CAND, SEL, CNT, pid, sp, b, p, NS, S1, top_n, n_sel_max,
                       G: tl.constexpr, GP: tl.constexpr, S1P: tl.constexpr, IDB: tl.constexpr,
                       TOP_K: tl.constexpr, BLOCK_C: tl.constexpr):
        """The selection of query row ``pid`` spread over its S1 compression programs, once all S1 have written
        their partials (the row's counter at S1; blocks and selection blocks coincide, one tile of BLOCK_C
        compressed blocks per program, its logits ``s`` fp32 [GP, BLOCK_C] still in registers): each merges the
        row's log-sum-exps, scores its own tile and keeps its top ``TOP_K`` keys (the keys of `_select_row`); the
        last of them to count in (at 2·S1) takes the top-n of the S1·TOP_K kept keys, writes the chosen ids and
        zeroes the counter (every program has left its wait)."""
        g = tl.arange(0, GP)
        lse = _row_lse(M1, L1, pid, S1, GP, S1P)

        # scores of the tile's blocks, the heads added in order as in `_select_row` (adding the masked zeros is
        # exact), and the tile's top keys
        c = sp * BLOCK_C + tl.arange(0, BLOCK_C)
        prob = tl.exp(s - lse[:, None])  # invisible blocks and padding heads: 0
        score = tl.zeros([BLOCK_C], tl.float32)
        for gg in tl.static_range(G):
            score += tl.sum(tl.where(g[:, None] == gg, prob, 0.0), 0)
        cand = (c < NS) & (tl.load(SEND + b.to(tl.int64) * NS + c, mask=c < NS, other=2147483647) <= p)
        r = tl.arange(0, TOP_K)
        tl.store(CAND + (pid * S1 + sp).to(tl.int64) * TOP_K + r, tl.topk(_block_keys(score, c, cand, IDB), TOP_K))

        if _arrive(CNT, pid) == 2 * S1 - 1:
            kept = tl.arange(0, S1P * TOP_K)
            keys = tl.load(CAND + pid.to(tl.int64) * S1 * TOP_K + kept, mask=kept < S1 * TOP_K, other=-1,
                           cache_modifier=".cg")
            tl.store(SEL + pid.to(tl.int64) * n_sel_max + r, _block_ids(tl.topk(keys, TOP_K), r, top_n, IDB),
                     mask=r < n_sel_max)
            tl.store(CNT + pid, 0)

    # tiles_per_split is not specialised: Triton's specialisation of an integer argument equal to 1 (one tile per
    # program, the default split at long context) made this kernel ~12× slower on an H100 (80 against 7 µs at 128K).
    @triton.jit(do_not_specialize=["tiles_per_split"])
    def _dec_cmp_kernel(Q, KC, VC, CEND, S, M1, L1, O1, LSE, SEND, BFIRST, BLAST, SEL, CNT, CAND,
                        sqb, sqh, sqt, skb, skh, skc, svb, svh, svc,
                        TQ, p0, NC, NS, S1, tiles_per_split, top_n, n_sel_max, scale,
                        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                        BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, S1P: tl.constexpr, NS_PAD: tl.constexpr,
                        W_BAND: tl.constexpr, IDB: tl.constexpr, TOP_K: tl.constexpr, SELECT: tl.constexpr,
                        PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()  # the attention kernel may start its text and window work now
        pid = tl.program_id(0)
        sp = tl.program_id(1)
        t, b, hkv, q = _row_query(Q, pid, TQ, sqb, sqh, sqt, HKV, G, GP, D)
        q = q.to(tl.float32)
        p = p0 + t
        g = tl.arange(0, GP)
        gv = g < G
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        kb = KC + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
        vb = VC + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
        m = tl.full([GP], float("-inf"), tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DV], tl.float32)
        row = (pid * GP + g).to(tl.int64)
        s = tl.full([GP, BLOCK_C], float("-inf"), tl.float32)  # the (last) tile's logits, for the spread selection
        for it in range(0, tiles_per_split):
            c = (sp * tiles_per_split + it) * BLOCK_C + tl.arange(0, BLOCK_C)
            cok = c < NC
            kc = tl.load(kb + c.to(tl.int64)[:, None] * skc + d[None, :], mask=cok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kc), input_precision="ieee") * scale  # exact fp32 logits
            end = tl.load(CEND + b.to(tl.int64) * NC + c, mask=cok, other=2147483647)
            vis = cok & (end <= p)
            s = tl.where(vis[None, :] & gv[:, None], s, float("-inf"))
            if SELECT != 2:  # scored from memory by the row's last program or the select kernel
                tl.store(S + row[:, None] * NC + c[None, :], s, mask=cok[None, :] & gv[:, None])
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            e = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            vc = tl.load(vb + c.to(tl.int64)[:, None] * svc + dv[None, :], mask=cok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(e.to(vc.dtype), vc, input_precision=PRECISION)
            l = l * alpha + tl.sum(e, 1)
            m = m_new
        o = (pid * S1 + sp).to(tl.int64) * GP + g
        tl.store(M1 + o, m)
        tl.store(L1 + o, l)
        tl.store(O1 + o[:, None] * DV + dv[None, :], acc)
        if SELECT == 1:  # the row's last program to finish runs its top-n (one launch fewer)
            if _arrive(CNT, pid) == S1 - 1:
                _select_row(S, M1, L1, LSE, SEND, BFIRST, BLAST, SEL, pid, TQ, p0, NC, NS, S1, top_n, n_sel_max,
                            HKV, G, GP, S1P, NS_PAD, W_BAND, IDB, TOP_K)
                tl.store(CNT + pid, 0)  # zero again for the next launch
        if SELECT == 2:  # the selection spread over the row's programs (one tile each)
            _arrive(CNT, pid)
            _wait_for(CNT, pid, S1)
            _select_spread(s, M1, L1, SEND, CAND, SEL, CNT, pid, sp, b, p, NS, S1, top_n, n_sel_max, G, GP, S1P,
                           IDB, TOP_K, BLOCK_C)

    @triton.jit
    def _dec_select_kernel(S, M1, L1, LSE, SEND, BFIRST, BLAST, SEL,
                           TQ, p0, NC, NS, S1, top_n, n_sel_max,
                           HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, S1P: tl.constexpr,
                           NS_PAD: tl.constexpr, W_BAND: tl.constexpr, IDB: tl.constexpr, TOP_K: tl.constexpr):
        """One program per (batch, KV head, query): `_select_row` in its own launch."""
        _select_row(S, M1, L1, LSE, SEND, BFIRST, BLAST, SEL, tl.program_id(0), TQ, p0, NC, NS, S1, top_n, n_sel_max,
                    HKV, G, GP, S1P, NS_PAD, W_BAND, IDB, TOP_K)

    @triton.jit
    def _dec_attn_kernel(Q, K, V, SEL, SSTART, SEND, TSTART, TEND, NTXT, M2, L2, O2,
                         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                         TQ, p0, NS, NT, S2, anchor, n_sel_max, window, scale,
                         HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                         BLOCK_N: tl.constexpr, NCH: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        j = tl.program_id(1)
        t, b, hkv, q = _row_query(Q, pid, TQ, sqb, sqh, sqt, HKV, G, GP, D)
        p = p0 + t
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        rowb = b.to(tl.int64) * NS

        kb = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
        vb = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
        nar = tl.arange(0, BLOCK_N)

        # The row's work items: the chosen blocks by rank, then the text chunks (selection branch), then the
        # window's chunks, numbered in that order; program j takes items j, j+S2, …. Text and window first: they
        # do not need the selection, so under programmatic dependent launch (PDL) they overlap the compression
        # kernel, and only the chosen blocks wait for it.
        m_s = tl.full([GP], float("-inf"), tl.float32)
        l_s = tl.zeros([GP], tl.float32)
        a_s = tl.zeros([GP, DV], tl.float32)
        ntxt = tl.load(NTXT + b)
        n_tail = tl.cdiv(tl.maximum(p + 1 - anchor, 0), BLOCK_N)
        n_text = ntxt + n_tail
        for it in range((j + S2 - n_sel_max % S2) % S2, n_text, S2):
            in_tab = it < ntxt
            ts = tl.load(TSTART + b.to(tl.int64) * NT + it, mask=in_tab, other=0)
            te = tl.load(TEND + b.to(tl.int64) * NT + it, mask=in_tab, other=0)
            tail = anchor + (it - ntxt) * BLOCK_N
            ts = tl.where(in_tab, ts, tail)
            te = tl.where(in_tab, te, tail + BLOCK_N)
            keys = ts + nar
            kok = (keys < te) & (keys <= p)
            m_s, l_s, a_s = _attend_chunk(q, kb, vb, skt, svt, keys, kok, m_s, l_s, a_s, scale, d, dv, PRECISION)

        m_w = tl.full([GP], float("-inf"), tl.float32)
        l_w = tl.zeros([GP], tl.float32)
        a_w = tl.zeros([GP, DV], tl.float32)
        lo = tl.maximum(p - window + 1, 0)
        for it in range((j + S2 - (n_sel_max + n_text) % S2) % S2, tl.cdiv(p + 1 - lo, BLOCK_N), S2):
            keys = lo + it * BLOCK_N + nar
            m_w, l_w, a_w = _attend_chunk(q, kb, vb, skt, svt, keys, keys <= p, m_w, l_w, a_w, scale, d, dv,
                                          PRECISION)

        if PDL:
            gdc_wait()  # the compression kernel (and its selection) is complete and its writes visible
        for r in range(j, n_sel_max, S2):
            sid = tl.load(SEL + pid.to(tl.int64) * n_sel_max + r)
            valid = sid >= 0
            st = tl.load(SSTART + rowb + sid, mask=valid, other=0)
            en = tl.load(SEND + rowb + sid, mask=valid, other=-1)
            for c in tl.static_range(NCH):
                keys = st + c * BLOCK_N + nar
                kok = (keys <= en) & (keys <= p)  # en = −1 when r ≥ n_chosen
                m_s, l_s, a_s = _attend_chunk(q, kb, vb, skt, svt, keys, kok, m_s, l_s, a_s, scale, d, dv,
                                              PRECISION)

        o = ((pid * S2 + j) * 2).to(tl.int64) * GP + g
        tl.store(M2 + o, m_s)
        tl.store(L2 + o, l_s)
        tl.store(O2 + o[:, None] * DV + dv[None, :], a_s)
        tl.store(M2 + o + GP, m_w)
        tl.store(L2 + o + GP, l_w)
        tl.store(O2 + (o + GP)[:, None] * DV + dv[None, :], a_w)

    @triton.jit
    def _merge(Mp, Lp, Op, pid, NSPL, NBR: tl.constexpr, br: tl.constexpr, gg, GP: tl.constexpr,
               SP: tl.constexpr, dv, DV: tl.constexpr):
        """Merge the online-softmax partials of one row over NSPL splits; zeros when nothing was visible."""
        s = tl.arange(0, SP)
        sok = s < NSPL
        o = ((pid * NSPL + s) * NBR + br).to(tl.int64) * GP + gg
        ms = tl.load(Mp + o, mask=sok, other=float("-inf"))
        ls = tl.load(Lp + o, mask=sok, other=0.0)
        mx = tl.max(ms, 0)
        w = tl.exp(ms - tl.where(mx == float("-inf"), 0.0, mx))
        tot = tl.sum(ls * w, 0)
        acc = tl.sum(tl.load(Op + o[:, None] * DV + dv[None, :], mask=sok[:, None], other=0.0) * w[:, None], 0)
        return tl.where(tot > 0, acc / tl.where(tot > 0, tot, 1.0), 0.0)

    @triton.jit
    def _dec_combine_kernel(M1, L1, O1, M2, L2, O2, GATES, FIRSTV, OUT,
                            sgb, sgh, sgt, sgc, sob, soh, sot,
                            TQ, p0, S1, S2,
                            HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DV: tl.constexpr,
                            S1P: tl.constexpr, S2P: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_wait()  # the attention kernel is complete (and, through its own wait, the compression kernel)
        pid = tl.program_id(0)
        gg = tl.program_id(1)
        t = pid % TQ
        bh = pid // TQ
        b = bh // HKV
        hkv = bh % HKV
        p = p0 + t
        h = hkv * G + gg
        dv = tl.arange(0, DV)
        o_c = _merge(M1, L1, O1, pid, S1, 1, 0, gg, GP, S1P, dv, DV)
        o_s = _merge(M2, L2, O2, pid, S2, 2, 0, gg, GP, S2P, dv, DV)
        o_w = _merge(M2, L2, O2, pid, S2, 2, 1, gg, GP, S2P, dv, DV)
        gb = GATES + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh + t.to(tl.int64) * sgt
        g0 = tl.load(gb).to(tl.float32)
        g1 = tl.load(gb + sgc).to(tl.float32)
        g2 = tl.load(gb + 2 * sgc).to(tl.float32)
        out = g0 * o_c + g1 * o_s + g2 * o_w
        out = tl.where(tl.load(FIRSTV + b) < p, out, o_s)  # no video before the query: dense (= selection)
        tl.store(OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + t.to(tl.int64) * sot + dv,
                 out.to(OUT.dtype.element_ty))


_COUNTERS: dict[tuple, Tensor] = {}


def _counters(device: torch.device, n: int) -> Tensor:
    """int32 tickets, one per query row, zero between launches (the compression kernel's last program of each row
    resets its own), kept per device and stream so that launches in flight on two streams never share one."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:
        c = _COUNTERS[key] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return c


# Tests set this to fill the kernels' scratch buffers with NaN (nothing may be read before it is written).
POISON_SCRATCH = False


def _scratch(sizes: tuple[int, ...], device: torch.device) -> list[Tensor]:
    """fp32 buffers of the given element counts, carved from one allocation (one allocator call per launch
    group: the decode step's host time counts). Poisoned with NaN when `POISON_SCRATCH` (viewed as int32, as the
    chosen-id buffer is, NaN is an id far out of range)."""
    padded = [-(-n // 32) * 32 for n in sizes]  # every buffer 128-byte aligned (Triton specialises on alignment)
    if POISON_SCRATCH:
        flat = torch.full((sum(padded),), float("nan"), dtype=torch.float32, device=device)
    else:
        flat = torch.empty(sum(padded), dtype=torch.float32, device=device)
    return [part[:n] for part, n in zip(flat.split(padded), sizes)]


@functools.lru_cache(maxsize=None)
def _use_pdl(device: torch.device) -> bool:
    return HAS_PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


# The spread selection pays from this many compression tiles per row (one per program): H100, `videonsa`, one
# query, with the launch widths below: 128K (32 tiles) 19.5 against 25.3 µs with the selection in the row's last
# program, 64K (16 tiles) 17.3–17.5 against 19.2, 32K (8 tiles) 19.2 against 16.7–16.8, 16K 15.6–15.8 against
# 15.6–15.7 (BENCHMARKS.md, fifteenth session).
SPREAD_MIN_TILES = 16
# Launch widths (H100, `videonsa`, one query; old and new package in one call): the compression kernel with the
# spread selection on 4 warps (8 before; 2 spill: ~10×), the attention kernel on 8 (4 before; 2 slower): 128K
# 21.3 → 20.0–20.5 µs, 64K 18.7 → 17.3–17.6, 32K (last-program selection, attention width only) 16.1–16.4 →
# 16.6–16.7; with the logits kept in registers for the spread scoring, 128K 19.1–19.3 (BENCHMARKS.md, fifteenth
# session).
SPREAD_CMP_WARPS = 4
ATTN_WARPS = 8


def _target_programs(device: torch.device) -> int:
    return 2 * sm_count(device)


def sparse_decode_triton(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, state: DecodeState, scale: float,
                         top_n: int, window_size: int, split_cmp: int | None = None,
                         split_attn: int | None = None, out: Tensor | None = None, schedule: str = "auto",
                         pdl: bool | None = None) -> Tensor:
    """Sparse attention of the Tq **text** queries at the end of the cache over the kept state (module doc: three
    launches, no host sync, CUDA-graph capturable).

    Args:
        q: [B, Hq, Tq, D]; k, v: the cache [B, Hkv, Tk, D] / [B, Hkv, Tk, Dv] (Tk ≥ state.anchor; keys after the
            anchor are text); gates: [B, Hq, Tq, 3] (any strides, e.g. expanded constants); same float dtype for
            q, k, v (fp16 / bf16 / fp32; fp32 dots in IEEE precision).
        state: `build_decode_state` of these keys (its compressed K/V are read, not recomputed).
        scale: softmax scale; top_n, window_size: `NSAConfig` fields.
        split_cmp, split_attn: programs per (batch, KV head, query) of the compression and attention kernels
            (default: enough to fill the GPU).
        out: optional [B, Hq, Tq, Dv] tensor of q's dtype to write into (every entry is written).
        schedule: where the top-n runs. ``"spread"``: over the compression kernel's programs of each row (each
            scores its own tile after a wait for the row's partials; needs CUDA, blocks and selection blocks
            coinciding, one tile per program, top-n ≤ 64 and the whole grid resident at once: at most one
            program per SM); ``"last"``: in the row's last compression program to finish; ``"separate"``: in a
            launch of its own (`_dec_select_kernel`, four launches); ``"auto"`` (default): spread where it can
            and a row has at least `SPREAD_MIN_TILES` tiles, else last. The same picks and output in every
            schedule.
        pdl: launch the attention and combine kernels with programmatic dependent launch (default: on CUDA
            devices of compute capability ≥ 9.0 when Triton has it); the same output either way.
    Returns:
        [B, Hq, Tq, Dv] in q's dtype. Video queries are not handled here (their rows are meaningless).
    Raises:
        NSAInputError: a cache shorter than the state's anchor.
        ValueError: an unknown ``schedule``, or ``"spread"`` where its conditions do not hold.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Tk < state.anchor:
        raise NSAInputError(f"cache of {Tk} keys is shorter than the kept state's {state.anchor}")
    if schedule not in ("auto", "spread", "last", "separate"):
        raise ValueError(f"schedule must be 'auto', 'spread', 'last' or 'separate', got {schedule!r}")
    G = Hq // Hkv
    GP = _pow2(G, 16)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    NC, NS, NT = state.k_cmp.shape[2], state.sel_start.shape[1], state.txt_start.shape[1]
    BLOCK_C, BLOCK_N = 64, state.block_n
    NCH = -(-state.key[-1] // BLOCK_N)  # key tiles per selection block
    NS_PAD = _pow2(NS, 256)
    n_sel = min(top_n, NS)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    target = _target_programs(q.device)
    pdl = _use_pdl(q.device) if pdl is None else pdl
    launch_pdl = {"launch_pdl": True} if pdl else {}
    if out is None:
        out = torch.empty(B, Hq, Tq, Dv, dtype=q.dtype, device=q.device)
    elif out.shape != (B, Hq, Tq, Dv) or out.dtype != q.dtype:
        raise NSAInputError(f"out must be {(B, Hq, Tq, Dv)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    chunk = max(1, _SCRATCH_BYTES // max(1, B * Hkv * GP * NC * 4))
    for t0 in range(0, Tq, chunk):
        TQ = min(chunk, Tq - t0)
        rows = B * Hkv * TQ
        n_tiles = -(-NC // BLOCK_C)
        S1 = split_cmp or min(n_tiles, max(1, -(-target // rows)))
        tiles_per_split = -(-n_tiles // S1)
        S1 = -(-n_tiles // tiles_per_split)
        items = n_sel * NCH + -(-window_size // BLOCK_N) + NT + -(-(Tk - state.anchor) // BLOCK_N) + 1
        # one work item per attention program where there are at most 32 (more splits make the combine kernel's
        # one-warp merge tiles spill)
        S2 = split_attn or max(1, min(32, items, -(-2 * target // rows)))
        top_k = _pow2(n_sel, 2)
        # The spread selection waits, in each program, for the row's other programs: all must be resident at once
        # (one per SM is), so it runs only where the grid fits the SMs (the CPU interpreter runs programs in turn).
        spread_ok = (q.is_cuda and state.blocks_coincide and tiles_per_split == 1 and S1 > 1
                     and top_k <= BLOCK_C and rows * S1 <= sm_count(q.device))
        mode = {"auto": "spread" if spread_ok and S1 >= SPREAD_MIN_TILES else "last"}.get(schedule, schedule)
        if mode == "spread" and not spread_ok:
            raise ValueError(f"schedule='spread' needs CUDA, coinciding blocks, one tile per program, top-n ≤ "
                             f"{BLOCK_C} and at most one program per SM ({rows}·{S1} programs)")
        # logits; compression partials (m, l, o); selection and window partials; compression log-sum-exp per row
        # and head; chosen block ids and each program's kept keys of the spread selection (int32)
        S, M1, L1, O1, M2, L2, O2, LSE, SEL, CAND = _scratch((
            rows * GP * NC if mode != "spread" else 1, rows * S1 * GP, rows * S1 * GP, rows * S1 * GP * Dv,
            rows * S2 * 2 * GP, rows * S2 * 2 * GP, rows * S2 * 2 * GP * Dv, rows * GP, rows * max(n_sel, 1),
            rows * S1 * top_k if mode == "spread" else 1), q.device)
        SEL, CAND = SEL.view(torch.int32), CAND.view(torch.int32)
        qc, gc, oc = q[:, :, t0:t0 + TQ], gates[:, :, t0:t0 + TQ], out[:, :, t0:t0 + TQ]
        p0 = Tk - Tq + t0
        kc, vc = state.k_cmp, state.v_cmp
        cnt = _counters(q.device, rows)
        sel_args = (state.sel_end, state.band_first, state.band_last, SEL)
        sel_meta = dict(HKV=Hkv, G=G, GP=GP, S1P=_pow2(S1), NS_PAD=NS_PAD, W_BAND=state.band_width,
                        IDB=key_id_bits(NS), TOP_K=top_k)
        _dec_cmp_kernel[(rows, S1)](
            qc, kc, vc, state.cmp_end, S, M1, L1, O1, LSE, *sel_args, cnt, CAND,
            qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2),
            TQ, p0, NC, NS, S1, tiles_per_split, top_n, n_sel, scale,
            D=D, DV=Dv, BLOCK_C=BLOCK_C, PRECISION=precision,
            SELECT={"separate": 0, "last": 1, "spread": 2}[mode], PDL=pdl, **sel_meta,
            num_warps=SPREAD_CMP_WARPS if mode == "spread" else 8, num_stages=1)
        if mode == "separate":
            _dec_select_kernel[(rows,)](S, M1, L1, LSE, *sel_args, TQ, p0, NC, NS, S1, top_n, n_sel, **sel_meta,
                                        num_warps=8 if NS_PAD <= 8192 else 16)
        _dec_attn_kernel[(rows, S2)](
            qc, k, v, SEL, state.sel_start, state.sel_end, state.txt_start, state.txt_end, state.n_txt, M2, L2, O2,
            qc.stride(0), qc.stride(1), qc.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            TQ, p0, NS, NT, S2, state.anchor, n_sel, window_size, scale,
            HKV=Hkv, G=G, GP=GP, D=D, DV=Dv, BLOCK_N=BLOCK_N, NCH=NCH, PRECISION=precision, PDL=pdl,
            num_warps=ATTN_WARPS, num_stages=1, **launch_pdl)
        _dec_combine_kernel[(rows, G)](
            M1, L1, O1, M2, L2, O2, gc, state.first_video, oc,
            gc.stride(0), gc.stride(1), gc.stride(2), gc.stride(3), oc.stride(0), oc.stride(1), oc.stride(2),
            TQ, p0, S1, S2,
            HKV=Hkv, G=G, GP=GP, DV=Dv, S1P=_pow2(S1), S2P=_pow2(S2), PDL=pdl, num_warps=1, **launch_pdl)
    return out
