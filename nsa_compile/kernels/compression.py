"""Compression branch (NSA §3.3.1, eq. 7; VideoNSA's mean pooling): each video span's keys/values are pooled per
block of ``block_size`` tokens taken every ``block_stride`` tokens; a video query attends the complete compressed
blocks whose last token is at or before its position (from every earlier span and its own).

Reference implementation in plain PyTorch (the oracle for the Triton kernel of issue 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import VideoLayout, masked_attention


def compress_kv(k: Tensor, v: Tensor, layout: VideoLayout) -> tuple[Tensor, Tensor]:
    """Mean-pool keys and values over each compression block.

    Args:
        k: [B, Hkv, Tk, Dk]; v: [B, Hkv, Tk, Dv]; layout: from `video_layout` for the same keys.
    Returns:
        (k_cmp [B, Hkv, Nc, Dk], v_cmp [B, Hkv, Nc, Dv]); padded blocks hold the first key (never visible).
    """
    B, Hkv, Tk, _ = k.shape
    l = layout.block_size
    idx = layout.cmp_block_start[:, :, None] + torch.arange(l, device=k.device)  # [B, Nc, l]
    idx = torch.where(idx < Tk, idx, 0).reshape(B, 1, -1, 1)
    Nc = layout.num_cmp_blocks

    def pool(x: Tensor) -> Tensor:
        g = x.gather(2, idx.expand(B, Hkv, Nc * l, x.shape[-1]))
        return g.reshape(B, Hkv, Nc, l, x.shape[-1]).mean(3)

    return pool(k), pool(v)


def compression_reference(q: Tensor, k: Tensor, v: Tensor, layout: VideoLayout, scale: float,
                          positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention of every query over the compressed blocks visible to it.

    Args:
        q: [B, Hkv, G, Tq, D] (queries grouped by their KV head; query i at position Tk−Tq+i);
        k, v: [B, Hkv, Tk, D]; layout: `video_layout` of the keys; scale: softmax scale (1/sqrt(D) usually);
        positions: long [Tq], the queries' key positions (default: the last Tq).
    Returns:
        (o_cmp [B, Hkv, G, Tq, Dv], p_cmp [B, Hkv, G, Tq, Nc]): the output and the softmax probabilities that score
        the selection blocks. A query with no visible block gets zeros in both.
    """
    Tq, Tk = q.shape[3], k.shape[2]
    k_cmp, v_cmp = compress_kv(k, v, layout)
    p = torch.arange(Tk - Tq, Tk, device=q.device) if positions is None else positions
    visible = layout.cmp_block_end[:, None, None, None, :] <= p[None, None, None, :, None]  # [B,1,1,Tq,Nc]
    return masked_attention(q, k_cmp, v_cmp, visible, scale)
