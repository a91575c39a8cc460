"""Selection branch (NSA §3.3.2, eqs. 8-12): score each past video block of ``selection_block_size`` tokens by the
compression-branch probabilities, sum the scores over the query heads of one GQA group (so the whole group reads
the same blocks), keep the top-n blocks, and attend exactly their tokens plus the query's own block (causally) and
every earlier text key (always kept, like NSA's forced initial block).

A selection block's score is the sum of the probabilities of the compression blocks that overlap it (NSA eq. 9
counts the same overlaps, with multiplicities, when blocks are aligned; for l = d = l′ both are the identity).

Reference implementation in plain PyTorch (the oracle for the Triton kernel of issue 3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import VideoLayout, causal_attention


def _block_scores(p: Tensor, layout: VideoLayout) -> Tensor:
    """Selection-block scores [B, Hkv, C, Ns] from group-summed compression probabilities p [B, Hkv, C, Nc]: the
    sum over the compression blocks overlapping each selection block. Blocks are ordered by position, so each
    selection block overlaps a contiguous band of at most ``w`` compression blocks: a gather, not an Nc × Ns
    matrix product."""
    B, Hkv, C, Nc = p.shape
    sel_start, sel_end = layout.sel_block_start, layout.sel_block_end  # [B, Ns]
    first = torch.searchsorted(layout.cmp_block_end.contiguous(), sel_start.contiguous())  # first c with end ≥ start
    last = torch.searchsorted(layout.cmp_block_start.contiguous(), sel_end.contiguous(), right=True)  # exclusive
    last = torch.where(sel_start < layout.is_video.shape[1], last, first)  # padded selection blocks: empty band
    width = max(1, int((last - first).max()))
    idx = first[:, :, None] + torch.arange(width, device=p.device)  # [B, Ns, width]
    ok = (idx < last[:, :, None]) & (idx < Nc)
    p = torch.nn.functional.pad(p, (0, 1))  # column Nc is zero
    idx = torch.where(ok, idx, Nc).reshape(B, 1, 1, -1).expand(B, Hkv, C, -1)
    return p.gather(-1, idx).reshape(B, Hkv, C, -1, width).sum(-1)


def key_id_bits(num_blocks: int) -> int:
    """Bits of a top-n key that hold the block id: enough for ``num_blocks`` ids (at least 1)."""
    return max(1, (num_blocks - 1).bit_length())


@torch.no_grad()
def candidate_scores(p_cmp: Tensor, layout: VideoLayout, positions: Tensor) -> Tensor:
    """Selection-block scores of C queries (NSA eqs. 9-10: group-summed compression probabilities over the blocks'
    overlapping compression blocks), −1 where a block is not a candidate (it does not end before the query's own
    block starts). p_cmp: [B, Hkv, G, C, Nc]; positions: long [C]. Returns fp [B, Hkv, C, Ns]; candidates ≥ 0."""
    scores = _block_scores(p_cmp.sum(2), layout)  # [B, Hkv, C, Ns]
    own_start = layout.sel_start[:, positions]  # [B, C]
    candidate = layout.sel_block_end[:, None, :] < own_start[:, :, None]  # [B, C, Ns]
    return torch.where(candidate[:, None], scores, -1.0)


def select_block_ids(p_cmp: Tensor, layout: VideoLayout, positions: Tensor, top_n: int) -> Tensor:
    """Top-n past video blocks of each query, shared by the heads of a GQA group.

    Args:
        p_cmp: [B, Hkv, G, C, Nc] compression probabilities of C queries (from the compression branch).
        layout: `video_layout` of the keys; positions: long [C], the queries' key positions; top_n: n.
    Returns:
        long [B, Hkv, C, min(n, Ns)]: selection block ids, −1 where fewer than n candidates exist. Candidates are
        blocks that end before the query's own block starts; of equal scores (to 31 − ``key_id_bits(Ns)`` bits)
        the earlier block wins.
    """
    scores = candidate_scores(p_cmp, layout, positions)  # [B, Hkv, C, Ns], −1: not a candidate
    # Order "higher score first, then earlier block": one 32-bit key per block, the float32 bits of the
    # non-negative score (monotonic) with the low `key_id_bits(Ns)` bits replaced by the reversed block id, so a
    # plain top-k is deterministic and the Triton kernel sorts int32 keys. Scores that agree in their top
    # 31 − key_id_bits bits (8 exponent bits, ≥ 11 mantissa bits up to 4,096 blocks) count as tied.
    Ns = scores.shape[-1]
    idb = key_id_bits(Ns)
    bits = scores.float().clamp_min(0).view(torch.int32).long()
    key = ((bits >> idb) << idb) + ((1 << idb) - 1 - torch.arange(Ns, device=scores.device))
    key = torch.where(scores >= 0, key, -1)
    n = min(top_n, Ns)
    top = key.topk(n, dim=-1).indices
    chosen = key.gather(-1, top) >= 0
    return torch.where(chosen, top, -1)


def select_blocks(p_cmp: Tensor, layout: VideoLayout, Tq: int, top_n: int) -> Tensor:
    """`select_block_ids` of the last Tq positions as a bool mask [B, Hkv, 1, Tq, Ns]."""
    Tk = layout.is_video.shape[1]
    ids = select_block_ids(p_cmp, layout, torch.arange(Tk - Tq, Tk, device=p_cmp.device), top_n)
    return block_mask(ids, layout.sel_block_start.shape[1])


def block_mask(ids: Tensor, num_blocks: int) -> Tensor:
    """Block ids [B, Hkv, Tq, n] (any integer dtype, −1: none) as a bool mask [B, Hkv, 1, Tq, num_blocks]."""
    mask = torch.zeros(ids.shape[:3] + (num_blocks + 1,), dtype=torch.bool, device=ids.device)
    mask.scatter_(-1, torch.where(ids < 0, num_blocks, ids.long()), True)
    return mask[..., :-1][:, :, None]


def selection_reference(q: Tensor, k: Tensor, v: Tensor, layout: VideoLayout, selected: Tensor, scale: float,
                        bias: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Exact attention over the selected blocks, the query's own block up to itself, and earlier text keys.

    Args:
        q: [B, Hkv, G, Tq, D]; k, v: [B, Hkv, Tk, D]; selected: [B, Hkv, 1, Tq, Ns] from `select_blocks`;
        bias: optional additive mask [B|1, Hkv|1, G|1, Tq, Tk]; rows: optional bool [B, Tq] of the queries needed.
    Returns:
        o_slc [B, Hkv, G, Tq, Dv].
    """
    Tq, Tk = q.shape[3], k.shape[2]
    own_start = layout.sel_start[:, Tk - Tq:]

    def keys(i0: int, i1: int, lo: int, hi: int) -> Tensor:
        video = layout.is_video[:, None, None, None, lo:hi]
        sel_id = layout.sel_id[:, None, None, None, lo:hi].expand(-1, selected.shape[1], 1, i1 - i0, -1)
        chosen = selected[:, :, :, i0:i1].gather(-1, sel_id)
        j = torch.arange(lo, hi, device=q.device)
        own = j[None, None, None, None, :] >= own_start[:, None, None, i0:i1, None]
        return ~video | chosen | own

    return causal_attention(q, k, v, scale, Tk, keys, bias, rows)
