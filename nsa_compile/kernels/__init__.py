"""NSA kernels: one module per branch (compression, selection, sliding window), each with its plain-PyTorch
reference, and the gated op `nsa.nsa_attention` registered as ``torch.ops.nsa_compile.nsa_attention``."""

from .common import MAX_HEAD_DIM, SUPPORTED_DTYPES, NSAInputError, attention_budget, video_layout
from .nsa import nsa_attention, nsa_reference

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DTYPES", "NSAInputError", "attention_budget", "nsa_attention",
           "nsa_reference", "video_layout"]
