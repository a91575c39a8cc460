"""nsa-compile: a ``torch.compile`` backend that rewrites a video-language model's language-model attention over
video tokens into gated Native Sparse Attention (NSA); text keeps dense attention."""

from .config import NSAConfig, NSAConfigError

__all__ = ["NSAConfig", "NSAConfigError"]
__version__ = "0.1.0"
