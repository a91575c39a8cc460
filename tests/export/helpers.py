"""Shared pieces of the export tests: configs, a relative error, a one-layer model and video masks."""

import torch

from nsa_compile import NSAConfig

# Overlapping compression blocks (stride < size), partial selection blocks, a window shorter than the sequence.
LAYER_CFG = NSAConfig(block_size=8, block_stride=4, selection_block_size=8, top_n=2, window_size=12)
QWEN_CFG = NSAConfig(block_size=16, block_stride=8, selection_block_size=16, top_n=2, window_size=24)


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64 (a must be finite)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def video_mask(B: int, T: int, seed: int) -> torch.Tensor:
    """Two or three video spans per row at random places, different per row (some rows start with video)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        cuts = sorted(torch.randint(0, T, (4,), generator=g).tolist())
        m[b, cuts[0]:cuts[1]] = True
        m[b, cuts[2] + 1:cuts[3]] = True
        if b % 2:
            m[b, :3] = True
    return m
