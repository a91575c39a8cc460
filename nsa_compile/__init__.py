"""nsa-compile: a ``torch.compile`` backend that rewrites a video-language model's language-model attention over
video tokens into gated Native Sparse Attention (NSA); text keeps dense attention.

    import nsa_compile
    compiled = nsa_compile.compile(model, nsa_compile.NSAConfig.preset("videonsa"))
    # or: torch.compile(model, backend="nsa", options={"preset": "videonsa"})
"""

from .backend import NSABackend, NSAStrictError, VideoMaskMissing, compile, last_report, video_mask
from .config import NSAConfig, NSAConfigError
from .kernels import NSAInputError, nsa_attention, nsa_reference

__all__ = ["NSABackend", "NSAConfig", "NSAConfigError", "NSAInputError", "NSAStrictError", "VideoMaskMissing",
           "compile", "last_report", "nsa_attention", "nsa_reference", "video_mask"]
__version__ = "0.1.0"
