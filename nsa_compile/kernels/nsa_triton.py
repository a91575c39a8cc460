"""The Triton path of ``nsa_compile::nsa_attention``: the semantics of `nsa.nsa_reference` (without ``attn_mask``),
every attention computed by the kernels of `segment_attention`.

Forward: dense attention for text queries (mode DENSE); for video queries the compression branch (mode COMPRESSED
over mean-pooled keys, giving the log-sum-exp), the top-n blocks of every position (`select_topn`, from that
log-sum-exp, in registers), the selection branch (mode SELECTION) and the sliding window (mode WINDOW). Each launch
adds ``gate · o_branch`` to the output (NSA eq. 5; a row's first branch sets it), so no per-branch output is kept.
Backward, branch by
branch: one pass over the forward's keys recomputes the softmax statistics and the per-row ``Σ dO·o_branch`` (the
gate gradient) and accumulates dq; a second pass, per key block, accumulates dk and dv. No atomics, so forward and
backward are bitwise reproducible. Head dims that are not a power of two (80, 96, …) are zero-padded to the next
one: scores and outputs are unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from .common import MaskCache, NSAInputError, VideoLayout, video_layout
from .compression import compress_kv
from .segment_attention import (COMPRESSED, COMPRESSED_SPLIT_BYTES, DENSE, DENSE_SPLIT_BYTES, SELECTION,
                                SELECTION_PARTIAL_BYTES, SELECTION_TEXT_PARTIAL_BYTES, WINDOW, SegmentPlan,
                                TopnGeometry, row_dot, segment_attention_bwd, segment_attention_fwd, select_topn,
                                selection_bwd, selection_bwd_partial_bytes, selection_fwd, tile_positions,
                                topn_geometry)

ORDER = ("dense", "compression", "selection", "window")  # compression first: selection needs its lse
BACKWARD_ORDER_BY_KEY = ("dense", "compression", "window", "selection")  # selection's delta needs the others'
# Each row's first branch in both orders (text rows have only dense): it sets the row's output, and in the
# backward its dq, which the later branches add to, so neither is zeroed.
FIRST = ("dense", "compression")


def _pow2_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _text_chunks(layout: VideoLayout, block_n: int) -> Tensor:
    """int32 [B, n_txt, 2]: (start, length) of every run of text keys cut in chunks of at most ``block_n``
    (length 0 pads rows with fewer chunks)."""
    text = ~layout.is_video
    B, Tk = text.shape
    dev = text.device
    pos = torch.arange(Tk, device=dev)
    prev = F.pad(text, (1, 0))[:, :-1]
    run_start = torch.where(text & ~prev, pos, 0).cummax(-1).values
    chunk_first = text & ((pos - run_start) % block_n == 0)
    n_txt = int(chunk_first.sum(-1).max()) if bool(text.any()) else 0
    out = torch.zeros(B, n_txt, 2, dtype=torch.int32, device=dev)
    if n_txt:
        rows, cols = chunk_first.nonzero(as_tuple=True)
        idx = chunk_first.long().cumsum(-1)[rows, cols] - 1
        run_end = torch.where(text & ~F.pad(text, (0, 1))[:, 1:], pos, Tk).flip(-1).cummin(-1).values.flip(-1)
        out[rows, idx, 0] = cols.to(torch.int32)
        out[rows, idx, 1] = torch.clamp(run_end[rows, cols] - cols + 1, max=block_n).to(torch.int32)
    return out


@dataclass
class _Tables:
    """What `_prepare` derives from the video mask alone: identical for every layer of a forward (and its
    backward), so it is built once and found again by `_tables`."""

    layout: VideoLayout
    video_q: Tensor  # bool [B, Tq]
    need_v: Tensor  # int8 [B, Tq]
    need_t: Tensor
    any_text: bool
    any_video: bool
    kend: Tensor | None  # the SELECTION and COMPRESSED plans' tables (None without video queries)
    own: Tensor | None
    block_start: Tensor | None
    block_len: Tensor | None
    text: Tensor | None
    topn: TopnGeometry | None
    text_tiles: dict = field(default_factory=dict)  # query tiles with text rows, per tile size (`_text_tiles`)


# The mask's tables, shared by the layers of a forward pass (and its backward): the first builds them (~10 host
# syncs), the others find them by content (one comparison). At most `MaskCache.keep` entries stay on the device
# after the call (~30 bytes per token each).
_TABLES = MaskCache()


def _tables(video_mask: Tensor, Tq: int, Tk: int, block_size: int, block_stride: int, selection_block_size: int,
            device: torch.device) -> _Tables:
    mask = video_mask.to(device)
    return _TABLES.get(mask, (Tq, Tk, block_size, block_stride, selection_block_size),
                       lambda: _build_tables(mask, Tq, Tk, block_size, block_stride, selection_block_size))


def _build_tables(mask: Tensor, Tq: int, Tk: int, block_size: int, block_stride: int,
                  selection_block_size: int) -> _Tables:
    layout = video_layout(mask, Tk, block_size, block_stride, selection_block_size)
    video_q = layout.is_video[:, Tk - Tq:]
    need_v = video_q.to(torch.int8).contiguous()
    need_t = (~video_q).to(torch.int8).contiguous()
    any_text, any_video = bool(need_t.any()), bool(need_v.any())
    kend = own = block_start = block_len = text = topn = None
    if any_video:
        # compressed keys padded to a multiple of 16 (ending at 2**31 − 1: never visible): Triton specialises the
        # key count's divisibility by 16, and the compression launch took 3.41 against 2.44 ms per KV head at 128K
        # with 2,047 compressed keys (a video after a prompt; H100, BENCHMARKS.md eleventh session)
        kend = layout.cmp_block_end.clamp(max=2**31 - 1).to(torch.int32)
        kend = F.pad(kend, (0, -kend.shape[1] % 16), value=2**31 - 1).contiguous()
        start, end = layout.sel_block_start, layout.sel_block_end
        own = torch.where(layout.is_video, layout.sel_id, -2).to(torch.int32).contiguous()
        block_start = start.clamp(max=Tk).to(torch.int32).contiguous()
        block_len = torch.where(start < Tk, end - start + 1, 0).to(torch.int32).contiguous()
        text = _text_chunks(layout, _pow2_block(selection_block_size)).contiguous()
        topn = topn_geometry(layout, Tq)
    return _Tables(layout, video_q, need_v, need_t, any_text, any_video, kend, own, block_start, block_len, text,
                   topn)


def _text_tiles(t: _Tables, block_t: int) -> tuple[Tensor, int]:
    """int32 [n]: the query tiles of ``block_t`` positions holding a text row of some batch row, and the last one's
    index (one host sync per mask and tile size: kept in the mask's tables, which every layer of a forward
    shares)."""
    found = t.text_tiles.get(block_t)
    if found is None:
        need = t.need_t.amax(0)
        has = F.pad(need, (0, -need.numel() % block_t)).view(-1, block_t).amax(1)
        tiles = torch.nonzero(has).flatten().cpu()
        found = t.text_tiles[block_t] = (tiles.to(device=need.device, dtype=torch.int32), int(tiles[-1]))
    return found


def _prepare(q: Tensor, k: Tensor, v: Tensor, video_mask: Tensor, block_size: int, block_stride: int,
             selection_block_size: int, window_size: int, key_valid: Tensor | None = None):
    """Layout, video-query flags and one (plan, keys, values) per branch that has rows to compute."""
    Tq, Tk = q.shape[2], k.shape[2]
    t = _tables(video_mask, Tq, Tk, block_size, block_stride, selection_block_size, k.device)
    branches = {}
    if t.any_text:
        # the forward splits the tiles' keys over several programs where they are few and long (`dense_splits`)
        block_t = tile_positions(q.shape[1], k.shape[1], q.dtype, DENSE)
        tiles, last = _text_tiles(t, block_t)
        walk = triton.cdiv(min(Tk - Tq + (last + 1) * block_t, Tk), SegmentPlan.block_n)  # the last tile's walk
        branches["dense"] = (SegmentPlan(DENSE, t.need_t, Tk, tiles=tiles, tiles_walk=walk), k, v)
    if t.any_video:
        pad = (0, 0, 0, t.kend.shape[1] - t.layout.num_cmp_blocks)  # rows to the padded count of `_build_tables`
        k_cmp, v_cmp = (F.pad(x, pad).contiguous() for x in compress_kv(k, v, t.layout))
        branches["compression"] = (SegmentPlan(COMPRESSED, t.need_v, Tk, gate=0, kend=t.kend), k_cmp, v_cmp)
        branches["selection"] = (SegmentPlan(
            SELECTION, t.need_v, Tk, gate=1, own=t.own, block_start=t.block_start, block_len=t.block_len,
            text=t.text, block_n=_pow2_block(selection_block_size), topn=t.topn), k, v)
        if window_size > 0:  # window 0: the branch's output is zero
            branches["window"] = (SegmentPlan(WINDOW, t.need_v, Tk, gate=2, window=window_size), k, v)
    if key_valid is not None:  # key padding of an attention mask: every branch but compression (video only)
        kv = key_valid.to(device=k.device, dtype=torch.int8).expand(k.shape[0], Tk).contiguous()
        for plan, _, _ in branches.values():
            plan.key_valid = kv
    return t.layout, t.video_q, branches


def _select(q: Tensor, k_cmp: Tensor, lse: Tensor, kend: Tensor, layout: VideoLayout, plan: SegmentPlan,
            top_n: int, scale: float, segments: bool = True, selected: Tensor | None = None) -> None:
    """Fill the selection plan: top-n block ids (`select_topn`, or ``selected`` int32 [B, Hkv, Tq, ≥ n] when the
    forward's are at hand: the backward then differentiates exactly the forward's picks) and, with ``segments``,
    the (start, length) of each position's n blocks and own block, the segments the backward's query-tile pass
    reads."""
    if selected is None:
        sel = select_topn(q, k_cmp, lse, kend, layout, plan.need, top_n, scale, plan.topn)  # [B, Hkv, Tq, n]
    else:
        sel = selected[..., :min(top_n, layout.sel_block_start.shape[1])].contiguous()
    plan.selected = sel
    if not segments:
        return
    sel = sel.sort(-1).values  # blocks in key order: neighbouring loads of a program are near in memory
    B, Hkv, Tq, n = sel.shape
    own = plan.own[:, plan.tk - Tq:].long()
    ids = torch.cat([sel.long(), own[:, None, :, None].expand(B, Hkv, Tq, 1)], -1)
    ok = (ids >= 0) & plan.need.bool()[:, None, :, None]
    idx = ids.clamp_min(0).reshape(B, Hkv, -1)
    Ns = plan.block_start.shape[1]
    start = plan.block_start[:, None, :].expand(B, Hkv, Ns).gather(2, idx).reshape(ids.shape)
    length = plan.block_len[:, None, :].expand(B, Hkv, Ns).gather(2, idx).reshape(ids.shape)
    plan.segments = torch.stack([start, torch.where(ok, length, 0)], -1).to(torch.int32).contiguous()


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the forward's dense (text-row) launch."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _pad_head_dims(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-pad D and Dv to powers of two (tl.arange needs them); q·k and the outputs' first Dv columns are
    unchanged."""
    D, Dv = q.shape[-1], v.shape[-1]
    Dp, Dvp = triton.next_power_of_2(D), triton.next_power_of_2(Dv)
    if Dp != D:
        q, k = F.pad(q, (0, Dp - D)), F.pad(k, (0, Dp - D))
    if Dvp != Dv:
        v = F.pad(v, (0, Dvp - Dv))
    return q, k, v


# Tests set this: the forward's output starts as NaN, so an element that no branch wrote fails.
POISON_OUTPUTS = False


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


# The forward's selection branch runs by key segment (`segment_attention.selection_fwd`) for GQA groups up to this
# size, by query tile above it. Its cost grows with the rows that read each segment (top-n × the group) and the
# query tile's with the blocks each position reads (top-n), the group sharing every load: on an H100 at 128K, group
# 7 (shape A) 69 against 80 ms per forward, group 16 (shape B) 86 against 44 (BENCHMARKS.md, twelfth session).
SELECTION_BY_KEY_MAX_GROUP = 8
# The backward's selection runs by key segment (`segment_attention.selection_bwd`, given the forward's top-n and
# log-sum-exp) for GQA groups up to this size: on an H100 at 128K, forward+backward of group 7 (shape A) 349 against
# 262 ms, group 16 (shape B) 302 against 276 (BENCHMARKS.md, sixteenth session); larger groups were not measured.
SELECTION_BWD_BY_KEY_MAX_GROUP = 16

# The forward runs the video rows' branches per chunk of KV heads (with their GQA groups) of at most this many query
# rows: the by-key selection keeps its per-segment partials for as many positions of a chunk as fit in
# `SELECTION_PARTIAL_BYTES`, so at long context one KV head per chunk gives it the longest runs of positions per
# launch; at short context, one chunk of all heads launches each kernel once.
KV_HEAD_CHUNK_ROWS = 1 << 19


def kv_head_chunks(B: int, Hkv: int, G: int, Tq: int) -> int:
    """Chunks the forward splits the KV heads in: the smallest divisor c of Hkv with B·(Hkv/c)·G·Tq query rows ≤
    `KV_HEAD_CHUNK_ROWS` (Hkv when none is), so every chunk compiles the same kernels."""
    return next((c for c in range(1, Hkv + 1) if Hkv % c == 0 and B * G * Tq * (Hkv // c) <= KV_HEAD_CHUNK_ROWS),
                Hkv)


def memory_estimate(B: int, Hq: int, Hkv: int, Tq: int, Tk: int, D: int, Dv: int, top_n: int,
                    backward: bool, itemsize: int = 2) -> int:
    """Bytes the Triton path allocates beyond its inputs (and, for the backward, beyond the output gradient) at its
    peak, for head dims D, Dv, ``top_n`` blocks and inputs of ``itemsize`` bytes: the forward's output and, for
    groups up to `SELECTION_BY_KEY_MAX_GROUP`, over one chunk of KV heads (`kv_head_chunks`), the selection's
    position lists and per-segment outputs (`segment_attention.selection_fwd`, at most
    `SELECTION_PARTIAL_BYTES`) and the text rows' split partial outputs (at most `DENSE_SPLIT_BYTES`); the
    backward's fp32 dq, dk, dv, the selection's position lists (`segment_attention._selection_walk`) or the
    compression's partial dk/dv
    (`segment_attention.compressed_dkdv_splits`), the top-n ids, softmax statistics and layout tables. An upper
    bound within a few percent (`_check_memory` compares it with the GPU's free memory before any kernel runs)."""
    Dp, Dvp = triton.next_power_of_2(D), triton.next_power_of_2(Dv)
    pad = (B * Hq * Tq * Dp + B * Hkv * Tk * Dp) * itemsize * (Dp != D) + B * Hkv * Tk * Dvp * itemsize * (Dvp != Dv)
    rows = B * Hq * Tq * 4 * 4  # lse, rowdot, delta, gates (fp32)
    sel = B * Hkv * Tq * top_n * 4
    layout = B * Tk * 8 * 12
    if not backward:
        G = Hq // Hkv
        chunks = kv_head_chunks(B, Hkv, G, Tq)
        out = B * Hq * Tq * Dv * itemsize
        by_key = 0
        if G <= SELECTION_BY_KEY_MAX_GROUP:  # one chunk of KV heads: entries sorted (ids, keys, int64 order), kept
            entries = B * (Hkv // chunks) * Tq * (top_n + 1)
            partial = min(SELECTION_PARTIAL_BYTES, entries * G * (Dvp * itemsize + 4))
            by_key = max(entries * 20, entries * 8 + partial)
        return (pad + out + rows + sel + layout + B * Hkv * Tk * (Dp + Dvp) * itemsize // 32 + by_key
                + DENSE_SPLIT_BYTES)
    csr = B * Hkv * Tq * (top_n + 1) * 5 * 4  # the selection's position lists: ids, sorted ids, order (int64), pos
    grads = B * Hq * Tq * Dp * 4 + B * Hkv * Tk * (Dp + Dvp) * 4 * 2  # dq; dk, dv and the unpooling temporaries
    partial = min(COMPRESSED_SPLIT_BYTES, B * Hkv * Tk * (Dp + Dvp) * 4)  # compression dk/dv per split, at most
    text = SELECTION_TEXT_PARTIAL_BYTES  # at most: the selection's partial dk/dv of text keys
    if Hq // Hkv <= SELECTION_BWD_BY_KEY_MAX_GROUP:  # the selection by key: per-segment dq, Σ P·dP, flags, delta
        budget = selection_bwd_partial_bytes(B * Hq * Tq * Dvp * itemsize)
        csr += min(budget, B * Hq * Tq * (top_n + 2) * (Dp * itemsize + 5)) + rows // 4
    return pad * 2 + grads + rows + sel + layout + text + max(csr, B * Hq * Tq * 3 * 4, partial)


def _check_memory(q: Tensor, k: Tensor, v: Tensor, top_n: int, selection_block_size: int, backward: bool) -> None:
    """Raise before any kernel runs when the request cannot fit in the device's free memory."""
    if not q.is_cuda:
        return
    n = min(top_n, -(-k.shape[2] // selection_block_size))  # the top-n kernel keeps at most one id per block
    need = memory_estimate(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3], n,
                           backward, q.element_size())
    free, _ = torch.cuda.mem_get_info(q.device)
    free += torch.cuda.memory_reserved(q.device) - torch.cuda.memory_allocated(q.device)
    if need > free:
        raise NSAInputError(
            f"NSA attention {'backward' if backward else 'forward'} at {k.shape[2]} tokens needs about "
            f"{need / 2**30:.2f} GiB of work memory, {free / 2**30:.2f} GiB is free on {q.device}: shorten the "
            "video (fewer frames or tokens per frame), free memory (smaller batch, activation checkpointing), or "
            "use a device with more memory")


def _check_scale(scale: float) -> None:
    """The kernels take each row's maximum of the unscaled scores q·k and scale it with them in one FFMA, which
    needs a positive scale."""
    if not scale > 0:
        raise NSAInputError(f"the NSA Triton kernels need a positive softmax scale, got {scale}: pass scale > 0 "
                            "(default 1/sqrt(head dim)), or run the PyTorch reference (`nsa_reference`, or CPU "
                            "tensors) for other scales")


def nsa_triton_forward(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor, scale: float,
                       block_size: int, block_stride: int, selection_block_size: int, top_n: int, window_size: int,
                       key_valid: Tensor | None = None, _keep: dict | None = None,
                       selected_out: Tensor | None = None, lse_out: Tensor | None = None) -> Tensor:
    """Forward of the op on Triton (CUDA, or the interpreter on CPU): shapes and semantics of `nsa_reference`;
    fp16 / bf16 / fp32, head dims up to 256 (the op sends fp32 above 128 to the reference: `nsa.max_head_dim`).
    An ``attn_mask`` is taken as ``key_valid`` (bool [B|1, Tk], the keys it leaves visible, see
    `nsa.key_padding`); other masks need the reference. The video rows' branches run per chunk of KV heads
    (`kv_head_chunks`), each adding its gated output to ``out`` in out's dtype (fp16 / bf16: two more roundings
    than one fp32 sum, ~1.5e-3 relative at 32K tokens of shape A); the text rows' dense branch runs once, on CUDA
    on a side stream beside them (joined before the return).
    ``_keep`` (tests) receives the layout, the video-query flags and ``selected``, the top-n block ids
    int32 [B, Hkv, Tq, n]. ``selected_out`` (int32 [B, Hkv, Tq, top_n], −1 filled by the caller) receives the top-n
    block ids for `nsa_triton_backward`'s ``selected``; ``lse_out`` (fp32 [B, Hq, Tq, 3]) the log-sum-exps of the
    compression, selection and sliding-window branches (the gates' order) of the video rows (0 in the others), for
    its ``lse``.

    Raises:
        NSAInputError: the work memory (`memory_estimate`) exceeds the GPU's free memory; ``scale`` ≤ 0.
    """
    _check_scale(scale)
    _check_memory(q, k, v, top_n, selection_block_size, backward=False)
    Dv = v.shape[-1]
    out = _empty(*q.shape[:3], Dv, dtype=q.dtype, device=q.device)
    q, k, v = _pad_head_dims(q, k, v)
    B, Hq, Tq, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    layout, video_q, branches = _prepare(q, k, v, video_mask, block_size, block_stride, selection_block_size,
                                         window_size, key_valid)
    step = Hkv // kv_head_chunks(B, Hkv, G, Tq)
    by_key = G <= SELECTION_BY_KEY_MAX_GROUP
    # Text rows have one branch (dense): it writes them to ``out``, for all heads in one launch. On CUDA that launch
    # runs on a side stream beside the video rows' launches (which write other rows): a prompt after a long video
    # has few rows, each reading every key, so its programs are few and long (after 128K keys: ~7 ms per chunk of
    # KV heads with the GPU otherwise idle; BENCHMARKS.md, eleventh session).
    side = None
    if "dense" in branches:
        plan, kk, vv = branches.pop("dense")
        if q.is_cuda and branches:
            main = torch.cuda.current_stream(q.device)
            side = _side_stream(q.device)
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            segment_attention_fwd(q, kk, vv, scale, plan, gates, first=True, out=out)
    # Video rows: the compression branch writes gate·o_cmp to ``out`` (no zeroing), and selection and window add
    # theirs there (each rounded to out's dtype, as fla-core's NSA sums its branches' outputs: no fp32 accumulator
    # of all rows, so the selection's per-segment partials get that memory).
    selected = []
    for h0 in range(0, Hkv, step):  # KV heads h0 … h0+step−1 and their query heads
        hq = slice(h0 * G, (h0 + step) * G)
        qc, g = q[:, hq], gates[:, hq].float().contiguous()
        for name in ORDER:
            if name in branches:
                plan, kk, vv = branches[name]
                kc, vc = kk[:, h0:h0 + step], vv[:, h0:h0 + step]
                run = selection_fwd if name == "selection" and by_key else segment_attention_fwd
                lse = run(qc, kc, vc, scale, plan, g, first=name in FIRST, out=out[:, hq])[0]
                if lse_out is not None and plan.gate >= 0:  # rows without the branch: 0
                    lse_out[:, hq, :, plan.gate] = torch.where(lse.isnan(), 0.0, lse)
                if name == "compression":
                    _select(qc, kc, lse, plan.kend, layout, branches["selection"][0], top_n, scale,
                            segments=not by_key)
                    if _keep is not None:
                        selected.append(branches["selection"][0].selected)
                    if selected_out is not None:
                        ids = branches["selection"][0].selected
                        selected_out[:, h0:h0 + step, :, :ids.shape[-1]] = ids
    if side is not None:
        main.wait_stream(side)  # q, k, v and the tables stay referenced (by the caller, the mask cache) until here
    if _keep is not None:
        _keep.update(layout=layout, video_q=video_q, selected=torch.cat(selected, 1) if selected else None)
    return out


def _unpool(d_cmp: Tensor, layout: VideoLayout, Tk: int, block_size: int, block_stride: int) -> Tensor:
    """Backward of mean pooling: key j gets Σ over the compression blocks holding it of d_cmp[c] / block_size.
    d_cmp [B, Hkv, Nc, D] → [B, Hkv, Tk, D]; summed in a fixed order (deterministic)."""
    B, Hkv, Nc, D = d_cmp.shape
    start, end = layout.cmp_block_start, layout.cmp_block_end  # [B, Nc], ascending
    j = torch.arange(Tk, device=d_cmp.device).expand(B, Tk).contiguous()
    first = torch.searchsorted(end.contiguous(), j)  # first block ending at or after j
    out = torch.zeros(B, Hkv, Tk, D, dtype=d_cmp.dtype, device=d_cmp.device)
    for w in range(-(-block_size // block_stride)):
        c = (first + w).clamp(max=Nc - 1)
        ok = (first + w < Nc) & (start.gather(1, c) <= j) & (end.gather(1, c) >= j)
        out += torch.where(ok[:, None, :, None], d_cmp.gather(2, c[:, None, :, None].expand(B, Hkv, Tk, D)), 0.0)
    return out / block_size


def nsa_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor,
                        scale: float, block_size: int, block_stride: int, selection_block_size: int, top_n: int,
                        window_size: int, key_valid: Tensor | None = None, selected: Tensor | None = None,
                        lse: Tensor | None = None, out: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dgates) of `nsa_triton_forward` in the inputs' dtypes. Recomputes the softmax statistics, and
    the top-n blocks unless ``selected`` (the forward's ``selected_out``) gives them; gate gradients are
    ``Σ_d dO·o_branch`` (NSA eq. 5); the top-n choice is not differentiated (NSA §3.3.2). Deterministic.
    With ``selected``, ``lse`` (the forward's ``lse_out``) and ``out`` (the forward's output), the compression and
    window passes take their softmax from the forward's log-sum-exp (no running maximum to rescale by), and for a
    GQA group up to `SELECTION_BWD_BY_KEY_MAX_GROUP` the selection branch's backward runs by key segment
    (`segment_attention.selection_bwd`), its delta from the output less the other branches' (FlashAttention-2).

    Raises:
        NSAInputError: the work memory (`memory_estimate`) exceeds the GPU's free memory; ``scale`` ≤ 0.
    """
    _check_scale(scale)
    _check_memory(q, k, v, top_n, selection_block_size, backward=True)
    D, Dv, dtypes = q.shape[-1], v.shape[-1], (q.dtype, k.dtype, v.dtype, gates.dtype)
    q, k, v = _pad_head_dims(q, k, v)
    # F.pad copies even when it pads nothing: at 128K that was a copy of dO (shape A 896 MiB) held all backward
    go = (grad_out if v.shape[-1] == Dv else F.pad(grad_out, (0, v.shape[-1] - Dv))).contiguous()
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    layout, video_q, branches = _prepare(q, k, v, video_mask, block_size, block_stride, selection_block_size,
                                         window_size, key_valid)
    g = gates.float().contiguous()
    # no zeroing: the first pass over each row sets its dq (text rows: dense; video rows: compression), the others
    # add to it (A at 128K: a 1.9 GiB fill and one read of it fewer; BENCHMARKS.md, twenty-second session)
    dq = _empty(*q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dgates = torch.zeros(g.shape, dtype=torch.float32, device=q.device)
    vq = video_q[:, None, :]
    state = selected is not None and lse is not None and out is not None
    by_key = (state and "selection" in branches
              and Hq // k.shape[1] <= SELECTION_BWD_BY_KEY_MAX_GROUP)
    video_deltas = []  # gate·Σ dO·o of the video rows' other branches, whose sum with the selection's is Σ dO·out
    # Text rows' pass (dense: few rows, each over every key, so a few long programs) runs on CUDA on the side stream
    # beside the video rows' passes, which write other rows of dq; its dk/dv, added to the same dk, dv as theirs,
    # follows the join (a 16-token text before a 128K video and a 48-token prompt after it: see BENCHMARKS.md,
    # thirteenth session).
    side = text_rows = None
    if "dense" in branches and len(branches) > 1 and q.is_cuda:
        main = torch.cuda.current_stream(q.device)
        side = _side_stream(q.device)
        side.wait_stream(main)
    for name in BACKWARD_ORDER_BY_KEY if by_key else ORDER:
        if name not in branches:
            continue
        plan, kk, vv = branches[name]
        if name == "selection" and by_key:
            d_slc = torch.where(vq, row_dot(go, out) - sum(video_deltas), 0.0).contiguous()
            rowd = selection_bwd(q, kk, vv, go, g, lse[..., plan.gate].contiguous(), d_slc, scale, plan, dq, dk,
                                 dv)
            dgates[..., plan.gate] = torch.where(vq, rowd, 0.0)
            continue
        on_side = name == "dense" and side is not None
        with torch.cuda.stream(side) if on_side else contextlib.nullcontext():
            known = lse[..., plan.gate].contiguous() if state and plan.gate >= 0 else None
            branch_lse, rowd = segment_attention_fwd(q, kk, vv, scale, plan, g, grad_out=go, dq=dq, lse=known,
                                                     first=name in FIRST)
            if plan.gate >= 0:
                dgates[..., plan.gate] = torch.where(vq, rowd, 0.0)
                delta = torch.where(vq, rowd * g[..., plan.gate], 0.0).contiguous()
            else:
                delta = torch.where(vq, 0.0, rowd).contiguous()
        if on_side:
            text_rows = (plan, kk, vv, branch_lse, delta)
            continue
        if name != "dense":
            video_deltas.append(delta)
        if name == "compression":
            _select(q, kk, branch_lse, plan.kend, layout, branches["selection"][0], top_n, scale,
                    segments=not by_key, selected=selected)
            dkc, dvc = torch.zeros(kk.shape, dtype=torch.float32, device=q.device), torch.zeros(
                vv.shape, dtype=torch.float32, device=q.device)
            segment_attention_bwd(q, kk, vv, go, g, branch_lse, delta, scale, plan, dkc, dvc)
            Nc = layout.num_cmp_blocks  # without the padding rows
            dk += _unpool(dkc[:, :, :Nc], layout, Tk, block_size, block_stride)
            dv += _unpool(dvc[:, :, :Nc], layout, Tk, block_size, block_stride)
        else:
            segment_attention_bwd(q, kk, vv, go, g, branch_lse, delta, scale, plan, dk, dv)
    if text_rows is not None:
        main.wait_stream(side)
        plan, kk, vv, branch_lse, delta = text_rows
        branch_lse.record_stream(main)  # allocated on the side stream, read on the caller's
        delta.record_stream(main)
        segment_attention_bwd(q, kk, vv, go, g, branch_lse, delta, scale, plan, dk, dv)
    return (dq[..., :D].to(dtypes[0]), dk[..., :D].to(dtypes[1]), dv[..., :Dv].to(dtypes[2]),
            dgates.to(dtypes[3]))
