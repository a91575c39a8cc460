"""Sliding-window branch (NSA §3.3.3): exact causal attention over the last ``window_size`` positions, text and
video alike. Reference implementation in plain PyTorch (the oracle for the Triton kernel of issue 3)."""

from __future__ import annotations

from torch import Tensor

from .common import causal_attention


def sliding_window_reference(q: Tensor, k: Tensor, v: Tensor, window_size: int, scale: float,
                             bias: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Attention of the query at position p over keys p−w+1 … p.

    Args:
        q: [B, Hkv, G, Tq, D] (query i at position Tk−Tq+i); k, v: [B, Hkv, Tk, D]; window_size: w ≥ 1;
        bias: optional additive mask [B|1, Hkv|1, G|1, Tq, Tk]; rows: optional bool [B, Tq] of the queries needed.
    Returns:
        o_swa [B, Hkv, G, Tq, Dv].
    """
    return causal_attention(q, k, v, scale, window_size, None, bias, rows)
