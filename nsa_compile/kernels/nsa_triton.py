"""The Triton path of ``nsa_compile::nsa_attention``: the same semantics as `nsa.nsa_reference`, with every
attention computed by the `segment_attention` kernel.

Forward: compression branch (mode COMPRESSED, over mean-pooled keys; gives the log-sum-exp), top-n block ids from
the compression probabilities (recomputed in query chunks so no [tokens × blocks] tensor exists at once), selection
(mode SELECTION over each tile's union of selected blocks, own blocks and text keys), sliding window (mode WINDOW),
dense attention for text queries (mode DENSE), then the gated combination. Backward recomputes the forward and runs
the kernel's backward per mode; gate gradients are ``Σ_d dO·o_branch``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import VideoLayout, video_layout
from .compression import compress_kv
from .segment_attention import (COMPRESSED, DENSE, SELECTION, WINDOW, SegmentPlan, _geometry,
                                group_compression_probs, segment_attention_bwd, segment_attention_fwd)
from .selection import select_block_ids

# Queries per chunk when scoring blocks: bounds the [B, Hkv, chunk, Nc] fp32 group scores to ~256 MB.
_SCORE_BYTES = 256 << 20


def _pow2_block(n: int) -> int:
    b = 16
    while b < n:
        b *= 2
    return b


def _selection_plan(q, k_cmp, lse_cmp, layout: VideoLayout, scale, top_n, sel_size, need) -> SegmentPlan:
    B, Hq, Tq, D = q.shape
    Hkv, Nc = k_cmp.shape[1], k_cmp.shape[2]
    Tk = layout.is_video.shape[1]
    G, GP, BLOCK_T = _geometry(Hq, Hkv, q.dtype, SELECTION)
    dev = q.device
    kend = layout.cmp_block_end.clamp(max=2**31 - 1).to(torch.int32).contiguous()
    chunk = max(1, _SCORE_BYTES // max(1, B * Hkv * Nc * 4))
    ids = []
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        pos = torch.arange(Tk - Tq + c0, Tk - Tq + c1, device=dev)
        p = group_compression_probs(q, k_cmp, lse_cmp, kend, Tk, scale, c0, c1 - c0)  # [B, Hkv, C, Nc]
        ids.append(select_block_ids(p[:, :, None], layout, pos, top_n))
    sel = torch.cat(ids, 2)  # [B, Hkv, Tq, n]  (−1: none)
    n = sel.shape[-1]

    # Per tile of BLOCK_T positions: the union of its rows' selected blocks and own blocks, as segments.
    n_tiles = -(-Tq // BLOCK_T)
    pad = n_tiles * BLOCK_T - Tq
    own = torch.where(layout.is_video, layout.sel_id, -2)[:, Tk - Tq:]  # [B, Tq]
    sel_t = torch.nn.functional.pad(sel, (0, 0, 0, pad), value=-1).reshape(B, Hkv, n_tiles, BLOCK_T * n)
    own_t = torch.nn.functional.pad(own, (0, pad), value=-2).reshape(B, 1, n_tiles, BLOCK_T).expand(-1, Hkv, -1, -1)
    cand = torch.cat([sel_t, own_t], -1).sort(-1).values
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[..., 1:] = cand[..., 1:] == cand[..., :-1]
    invalid = dup | (cand < 0)
    big = layout.sel_block_start.shape[1] + 1
    order = torch.where(invalid, big, cand).sort(-1).values
    n_valid = (~invalid).sum(-1)
    u = max(1, int(n_valid.max()))
    vid = order[..., :u]
    ok = vid < big
    vid_c = torch.where(ok, vid, 0)
    start = torch.gather(layout.sel_block_start[:, None, None, :].expand(-1, Hkv, n_tiles, -1), 3, vid_c)
    end = torch.gather(layout.sel_block_end[:, None, None, :].expand(-1, Hkv, n_tiles, -1), 3, vid_c)
    video_seg = torch.stack([start, torch.where(ok, end - start + 1, 0), torch.where(ok, vid, -3)], -1)

    # Text keys, in chunks of at most BLOCK_N, kept when they start before the tile's last position.
    block_n = _pow2_block(sel_size)
    text = ~layout.is_video
    pos = torch.arange(Tk, device=dev)
    prev_text = torch.nn.functional.pad(text, (1, 0))[:, :-1]
    run_start = torch.where(text & ~prev_text, pos, 0).cummax(-1).values
    chunk_first = text & ((pos - run_start) % block_n == 0)
    n_txt = int(chunk_first.sum(-1).max()) if text.any() else 0
    segs = [video_seg]
    if n_txt:
        rows, cols = chunk_first.nonzero(as_tuple=True)
        idx = chunk_first.long().cumsum(-1)[rows, cols] - 1
        t_start = torch.full((B, n_txt), Tk, dtype=torch.long, device=dev)
        t_start[rows, idx] = cols
        run_end = torch.where(text & ~torch.nn.functional.pad(text, (0, 1))[:, 1:], pos, Tk).flip(-1).cummin(-1)
        run_end = run_end.values.flip(-1)
        t_len = torch.zeros(B, n_txt, dtype=torch.long, device=dev)
        t_len[rows, idx] = torch.minimum(run_end[rows, cols] - cols + 1, torch.full_like(cols, block_n))
        tile_end = Tk - Tq + torch.arange(1, n_tiles + 1, device=dev) * BLOCK_T  # exclusive
        keep = t_start[:, None, :] < tile_end[None, :, None]  # [B, n_tiles, n_txt]
        text_seg = torch.stack([t_start[:, None, :].expand(-1, n_tiles, -1),
                                torch.where(keep, t_len[:, None, :], 0),
                                torch.full_like(keep, -1, dtype=torch.long)], -1)
        segs.insert(0, text_seg[:, None].expand(-1, Hkv, -1, -1, -1))
    segments = torch.cat(segs, 3).to(torch.int32).contiguous()
    counts = (n_valid + n_txt).to(torch.int32).contiguous()
    own_all = torch.where(layout.is_video, layout.sel_id, -2).to(torch.int32).contiguous()
    selected = torch.where(sel < 0, -3, sel).to(torch.int32).contiguous()
    return SegmentPlan(SELECTION, need, Tk, own_all, segments=segments, counts=counts, selected=selected,
                       block_n=block_n, n_text=n_txt, block_start=layout.sel_block_start,
                       block_end=layout.sel_block_end)


def _plans(q, k, v, video_mask, scale, block_size, block_stride, selection_block_size, top_n, window_size):
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    layout = video_layout(video_mask.to(k.device), Tk, block_size, block_stride, selection_block_size)
    video_q = layout.is_video[:, Tk - Tq:]
    need_v = video_q.to(torch.int8).contiguous()
    need_t = (~video_q).to(torch.int8).contiguous()
    own = torch.zeros(1, dtype=torch.int32, device=q.device)
    branches = {"dense": (SegmentPlan(DENSE, need_t, Tk, own), k, v)}
    if bool(video_q.any()):
        k_cmp, v_cmp = compress_kv(k, v, layout)
        k_cmp, v_cmp = k_cmp.contiguous(), v_cmp.contiguous()
        kend = layout.cmp_block_end.clamp(max=2**31 - 1).to(torch.int32).contiguous()
        cmp_plan = SegmentPlan(COMPRESSED, need_v, Tk, own, kend=kend)
        o_cmp, lse_cmp = segment_attention_fwd(q, k_cmp, v_cmp, scale, cmp_plan)
        branches["compression"] = (cmp_plan, k_cmp, v_cmp)
        branches["selection"] = (_selection_plan(q, k_cmp, lse_cmp, layout, scale, top_n, selection_block_size,
                                                 need_v), k, v)
        branches["window"] = (SegmentPlan(WINDOW, need_v, Tk, own, window=window_size), k, v)
        return layout, video_q, branches, {"compression": (o_cmp, lse_cmp)}
    return layout, video_q, branches, {}


def nsa_triton_forward(q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor, scale: float,
                       block_size: int, block_stride: int, selection_block_size: int, top_n: int, window_size: int,
                       _keep: dict | None = None) -> Tensor:
    """Forward of the op on Triton (CUDA, or the interpreter on CPU); shapes and semantics as `nsa_reference`
    without ``attn_mask``. fp16 / bf16 / fp32 inputs."""
    layout, video_q, branches, done = _plans(q, k, v, video_mask, scale, block_size, block_stride,
                                             selection_block_size, top_n, window_size)
    outs = dict(done)
    for name, (plan, kk, vv) in branches.items():
        if name not in outs:
            outs[name] = segment_attention_fwd(q, kk, vv, scale, plan)
    out = outs["dense"][0]
    if "compression" in outs:
        g = gates.float()
        mix = g[..., 0:1] * outs["compression"][0] + g[..., 1:2] * outs["selection"][0] + g[..., 2:3] * outs["window"][0]
        out = torch.where(video_q[:, None, :, None], mix, out)
    if _keep is not None:
        _keep.update(layout=layout, video_q=video_q, branches=branches, outs=outs)
    return out.to(q.dtype)


def nsa_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, video_mask: Tensor,
                        scale: float, block_size: int, block_stride: int, selection_block_size: int, top_n: int,
                        window_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dgates) of `nsa_triton_forward`, recomputing it first."""
    keep: dict = {}
    nsa_triton_forward(q, k, v, gates, video_mask, scale, block_size, block_stride, selection_block_size, top_n,
                       window_size, _keep=keep)
    layout, video_q, branches, outs = keep["layout"], keep["video_q"], keep["branches"], keep["outs"]
    go = grad_out.float()
    vq = video_q[:, None, :, None]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    dgates = torch.zeros(gates.shape, dtype=torch.float32, device=q.device)
    for i, name in enumerate(("compression", "selection", "window")):
        if name in outs:
            dgates[..., i] = torch.where(video_q[:, None], (go * outs[name][0]).sum(-1), 0.0)
    for name, (plan, kk, vv) in branches.items():
        if name == "dense":
            d_o = torch.where(vq, 0.0, go)
        else:
            d_o = torch.where(vq, go * gates.float()[..., ("compression", "selection", "window").index(name), None], 0.0)
        o, lse = outs[name]
        dq_b, dk_b, dv_b = segment_attention_bwd(q, kk, vv, o, lse, d_o, scale, plan)
        dq += dq_b
        if name == "compression":  # mean pooling's backward: each token of a block gets 1/l of its gradient
            idx = layout.cmp_block_start[:, :, None] + torch.arange(block_size, device=q.device)
            valid = (idx < k.shape[2]) & (layout.cmp_block_start[:, :, None] < k.shape[2])
            idx = torch.where(valid, idx, 0).reshape(k.shape[0], 1, -1, 1)
            w = valid.reshape(k.shape[0], 1, -1, 1).float() / block_size
            dk.scatter_add_(2, idx.expand(-1, k.shape[1], -1, k.shape[3]),
                            (dk_b[:, :, :, None, :].expand(-1, -1, -1, block_size, -1).reshape(dk.shape[0], dk.shape[1], -1, dk.shape[3])) * w)
            dv.scatter_add_(2, idx.expand(-1, v.shape[1], -1, v.shape[3]),
                            (dv_b[:, :, :, None, :].expand(-1, -1, -1, block_size, -1).reshape(dv.shape[0], dv.shape[1], -1, dv.shape[3])) * w)
        else:
            dk += dk_b
            dv += dv_b
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgates.to(gates.dtype)
