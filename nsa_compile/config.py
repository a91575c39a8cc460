"""`NSAConfig`: the one configuration object that flows from the user's call to every kernel.

Every field says where its value comes from. Two presets name known setups:

* ``videonsa`` — VideoNSA (arXiv 2510.02295, §3 and its released configuration): mean-pooled compression blocks of
  64 tokens with stride 64, selection blocks of 64, top-32 blocks, sliding window 256, gates from an MLP on the
  layer's attention-input hidden states (Linear → GELU → Linear, divided by a temperature 0.3, sigmoid), initial
  gates 0.5.
* ``paper`` — NSA (arXiv 2502.11089, §4.1 "Pretraining setup"): compression block l=32 with stride d=16, selection
  block l'=64, top-16 blocks, window w=512. The paper derives gates "from input features via an MLP and sigmoid"
  (§3.2, eq. 5) without fixing its shape; we use one linear layer and a sigmoid (temperature 1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

GATE_KINDS = ("mlp", "linear", "constant")
MODALITIES = ("video", "image")
GATE_DTYPES = ("auto", "float32", "bfloat16", "float16")
INNER_BACKENDS = ("eager", "inductor")
DECODE_MODES = ("dense", "sparse")
BRANCHES = ("compression", "selection", "sliding_window")


class NSAConfigError(ValueError):
    """An `NSAConfig` field is out of its range; the message names the field, the limit and the fix."""


@dataclass(frozen=True)
class NSAConfig:
    """Configuration of the NSA rewrite, its kernels and its gates.

    Attributes:
        block_size: compression block size l in tokens (NSA §3.3.1, eq. 7). Keys/values of each block are
            mean-pooled into one compressed key/value (VideoNSA's choice; NSA uses a learned MLP).
        block_stride: compression stride d in tokens (NSA §3.3.1); 1 ≤ d ≤ l. Blocks start every d tokens of a
            video span.
        selection_block_size: selection block size l' in tokens (NSA §3.3.2).
        top_n: number n of past video blocks each query selects (NSA §3.3.2, eq. 11). The query's own block and
            every earlier text key are kept on top of these n blocks.
        window_size: sliding-window size w in tokens (NSA §3.3.3): a query attends positions p−w+1 … p; 0 turns the
            sliding-window branch off (its output is zero, as fla-core's ``window_size=0``).
        gate: gate kind. ``"mlp"``: Linear(hidden→hidden) → GELU → Linear(hidden→3·heads) (VideoNSA);
            ``"linear"``: Linear(hidden→3·heads); both then divide by ``gate_temperature`` and apply a sigmoid
            (NSA §3.2, eq. 5). ``"constant"``: fixed gate values ``gate_init``, no parameters (ablations and the
            dense-equivalent setting).
        gate_init: initial gate values (compression, selection, sliding window), each in [0, 1]. Learned gates
            start at exactly these values (their last layer is zero, its bias set to the logit); values at 0 or 1
            are clipped to 1e-4 / 1−1e-4 there. VideoNSA starts at 0.5 for all three.
        gate_temperature: divisor of the gate logits before the sigmoid (VideoNSA: 0.3).
        gate_dtype: dtype of the gate parameters: ``"auto"`` takes the dtype of the attention module's
            parameters; otherwise a fixed float dtype. Gates are computed in that dtype and cast to float32 inside
            the NSA op, which accumulates in float32 for half-precision inputs.
        modalities: which token kinds count as "video" for the rewrite: ``("video",)`` or ``("video", "image")``.
        video_token_id: fallback id of the video placeholder token, used when the graph holding the attention does
            not show where vision features are merged (the merge lives in another graph or the user passes only
            ``input_ids``). ``None`` takes the model config's ``video_token_id`` (and ``image_token_id``).
        inner_backend: how the rewritten graph is compiled after AOTAutograd: ``"eager"`` (run the FX graphs
            as they are; fastest to compile) or ``"inductor"``.
        decode: how a *text* query attends in a call that extends a KV cache (fewer queries than keys: decode
            steps, a text continuation after a cached video). ``"dense"`` (default): exact causal attention over
            the whole cache. ``"sparse"``: like a video query (NSA §3.3 applied at decode): the compressed video
            blocks it can see, the top-n video blocks scored by its group-summed compression probabilities plus
            every text key, and the sliding window, mixed by its own gates; a text query with no video before it
            stays dense. Prefill calls are unchanged. The op keeps each layer's compressed video keys/values
            from the prefill and reuses them, so a decode step reads n blocks + the window + the compressed keys
            instead of the whole cache (README "Attention semantics" and "Decode"; not differentiable).
        strict: turn every fallback to dense attention into an error (`nsa_compile.backend.NSAStrictError`) naming the
            reason, instead of a warning: an attention site that stays dense (unsupported head dim or dtype, video
            tokens not identifiable, module not reachable), a sequence without video tokens, a call that ran no
            graph compiled by the backend (dynamo ran it eagerly), and, on CUDA, a site whose op would run the
            plain-PyTorch reference instead of the Triton kernels (head dim, dtype at compile time; an
            ``attn_mask`` that is more than key padding when the graph runs). Vision-encoder
            and bidirectional attention are never NSA sites and stay allowed. Default False.
    """

    block_size: int = 64
    block_stride: int = 64
    selection_block_size: int = 64
    top_n: int = 32
    window_size: int = 256
    gate: str = "mlp"
    gate_init: tuple[float, float, float] = (0.5, 0.5, 0.5)
    gate_temperature: float = 0.3
    gate_dtype: str = "auto"
    modalities: tuple[str, ...] = ("video",)
    video_token_id: int | None = None
    inner_backend: str = "eager"
    decode: str = "dense"
    strict: bool = False
    _preset: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gate_init", tuple(float(x) for x in self.gate_init))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        for name in ("block_size", "block_stride", "selection_block_size", "top_n", "window_size"):
            value = getattr(self, name)
            low = 0 if name == "window_size" else 1  # window 0: no sliding-window branch
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise NSAConfigError(f"NSAConfig.{name} must be an int ≥ {low}, got {value!r}")
        if self.block_stride > self.block_size:
            raise NSAConfigError(
                f"NSAConfig.block_stride ({self.block_stride}) must not exceed block_size ({self.block_size}): "
                "a larger stride would skip tokens in the compression branch (NSA §3.3.1 needs d ≤ l)"
            )
        if self.gate not in GATE_KINDS:
            raise NSAConfigError(f"NSAConfig.gate must be one of {GATE_KINDS}, got {self.gate!r}")
        if len(self.gate_init) != 3 or not all(0.0 <= g <= 1.0 for g in self.gate_init):
            raise NSAConfigError(
                "NSAConfig.gate_init must be three values in [0, 1] (compression, selection, sliding window), "
                f"got {self.gate_init!r}"
            )
        if not self.gate_temperature > 0:
            raise NSAConfigError(f"NSAConfig.gate_temperature must be > 0, got {self.gate_temperature!r}")
        if self.gate_dtype not in GATE_DTYPES:
            raise NSAConfigError(f"NSAConfig.gate_dtype must be one of {GATE_DTYPES}, got {self.gate_dtype!r}")
        if not self.modalities or any(m not in MODALITIES for m in self.modalities) or "video" not in self.modalities:
            raise NSAConfigError(
                f"NSAConfig.modalities must contain 'video' and only values of {MODALITIES}, got {self.modalities!r}"
            )
        if self.video_token_id is not None and (not isinstance(self.video_token_id, int) or self.video_token_id < 0):
            raise NSAConfigError(f"NSAConfig.video_token_id must be a non-negative int or None, got {self.video_token_id!r}")
        if self.inner_backend not in INNER_BACKENDS:
            raise NSAConfigError(f"NSAConfig.inner_backend must be one of {INNER_BACKENDS}, got {self.inner_backend!r}")
        if self.decode not in DECODE_MODES:
            raise NSAConfigError(f"NSAConfig.decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if not isinstance(self.strict, bool):
            raise NSAConfigError(f"NSAConfig.strict must be True or False, got {self.strict!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "NSAConfig":
        """The named preset (``"videonsa"`` or ``"paper"``), with fields overridden by keyword.

        Raises:
            NSAConfigError: unknown preset name or invalid override.
        """
        if name not in PRESETS:
            raise NSAConfigError(f"unknown NSA preset {name!r}; known presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], _preset=name, **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NSAConfig":
        """Build a config from a dict (e.g. ``torch.compile(..., options={...})``).

        A key ``"preset"`` starts from that preset; the other keys override its fields.

        Raises:
            NSAConfigError: unknown key (listing the known ones) or invalid value.
        """
        data = dict(data)
        preset = data.pop("preset", None)
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        unknown = set(data) - known
        if unknown:
            raise NSAConfigError(f"unknown NSAConfig option(s) {sorted(unknown)}; known: {sorted(known)} and 'preset'")
        if preset is not None:
            return cls.preset(preset, **data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict; ``NSAConfig.from_dict(c.to_dict()) == c``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["gate_init"] = list(self.gate_init)
        out["modalities"] = list(self.modalities)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def name(self) -> str:
        """The preset this config came from, or ``"custom"``."""
        return self._preset or "custom"

    def dense_equivalent(self) -> "NSAConfig":
        """The setting in which NSA reproduces dense causal attention: constant gates (0, 1, 0) and a top-n
        larger than any sequence's block count (README, "Attention semantics")."""
        return dataclasses.replace(self, gate="constant", gate_init=(0.0, 1.0, 0.0), top_n=1 << 30)


PRESETS: dict[str, NSAConfig] = {
    "videonsa": NSAConfig(
        block_size=64, block_stride=64, selection_block_size=64, top_n=32, window_size=256,
        gate="mlp", gate_init=(0.5, 0.5, 0.5), gate_temperature=0.3,
    ),
    "paper": NSAConfig(
        block_size=32, block_stride=16, selection_block_size=64, top_n=16, window_size=512,
        gate="linear", gate_init=(0.5, 0.5, 0.5), gate_temperature=1.0,
    ),
}
