"""Gates: per query and head, the weights of the three NSA branches, computed from the attention-input hidden states.

``g = sigmoid(f(x) / temperature)`` (NSA arXiv 2502.11089 §3.2, eq. 5) with ``f`` an MLP
Linear(hidden→hidden) → GELU → Linear(hidden→3·heads) (VideoNSA arXiv 2510.02295 §3; released as ``g_proj_1`` /
``g_proj_2``), or one Linear(hidden→3·heads). The gate modules become submodules ``<attention>.nsa_gate`` of the
user's model, so their parameters appear in ``named_parameters()``, ``state_dict()`` and optimizers.

Initialisation: the last linear layer has zero weights and a bias equal to ``temperature · logit(gate_init)``, so
before any training every gate equals ``gate_init`` exactly, whatever the input (gradients still reach every
parameter: the last layer's through the zero weights' inputs, then the first layer's once those move).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import NSAConfig

GATE_ATTR = "nsa_gate"


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


class NSAGate(nn.Module):
    """Gate module of one attention layer.

    Args:
        hidden: width of the attention-input hidden states; heads: query heads Hq; config: the `NSAConfig`.
    Forward:
        x [B, T, hidden] (any float dtype) → gates [B, Hq, T, 3] in the gates' dtype (compression, selection,
        sliding window).
    """

    def __init__(self, hidden: int, heads: int, config: NSAConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.kind, self.heads, self.temperature = config.gate, heads, config.gate_temperature
        self.register_buffer("init", torch.tensor(config.gate_init, dtype=torch.float32, device=device),
                             persistent=False)
        kw = {"dtype": dtype, "device": device}
        if self.kind == "mlp":
            self.proj_1 = nn.Linear(hidden, hidden, **kw)
            self.proj_2 = nn.Linear(hidden, 3 * heads, **kw)
        elif self.kind == "linear":
            self.proj_2 = nn.Linear(hidden, 3 * heads, **kw)
        if self.kind != "constant":
            with torch.no_grad():
                self.proj_2.weight.zero_()
                bias = torch.tensor([_logit(g) * self.temperature for g in config.gate_init]).repeat(heads)
                self.proj_2.bias.copy_(bias)

    def gate_parameters(self) -> list[Tensor]:
        """The parameters in the order `gate_forward` takes them."""
        if self.kind == "mlp":
            return [self.proj_1.weight, self.proj_1.bias, self.proj_2.weight, self.proj_2.bias]
        if self.kind == "linear":
            return [self.proj_2.weight, self.proj_2.bias]
        return []

    def forward(self, x: Tensor) -> Tensor:
        return gate_forward(x, self.kind, self.heads, self.temperature, tuple(self.init.tolist()),
                            *self.gate_parameters())


def gate_forward(x: Tensor, kind: str, heads: int, temperature: float, init: tuple[float, float, float],
                 *params: Tensor) -> Tensor:
    """Functional gate (what the rewritten graph calls): x [B, T, hidden] → [B, heads, T, 3].

    ``params`` as returned by `NSAGate.gate_parameters`; ``init`` gives the constant gates of kind ``"constant"``.
    """
    B, T = x.shape[0], x.shape[1]
    if kind == "constant":
        return torch.tensor(init, dtype=x.dtype, device=x.device).expand(B, heads, T, 3)
    h = x.to(params[0].dtype)
    if kind == "mlp":
        h = F.gelu(F.linear(h, params[0], params[1]))
        params = params[2:]
    g = torch.sigmoid(F.linear(h, params[0], params[1]) / temperature)
    return g.reshape(B, T, heads, 3).transpose(1, 2)


def gate_dtype(config: NSAConfig, attention: nn.Module) -> torch.dtype:
    if config.gate_dtype != "auto":
        return getattr(torch, config.gate_dtype)
    p = next(attention.parameters(), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def install_gate(attention: nn.Module, hidden: int, heads: int, config: NSAConfig) -> NSAGate:
    """Attach (or reuse) ``attention.nsa_gate``; constant gates (no parameters) are returned unattached.

    Raises:
        ValueError: an existing gate of another kind or shape is attached (from another config): remove it or use
            the same config.
    """
    p = next(attention.parameters(), None)
    if config.gate == "constant":
        return NSAGate(hidden, heads, config, device=p.device if p is not None else None)
    gate = getattr(attention, GATE_ATTR, None)
    if gate is not None:
        if gate.kind != config.gate or gate.heads != heads:
            raise ValueError(f"{type(attention).__name__} already has an nsa_gate of kind {gate.kind!r} with "
                             f"{gate.heads} heads; this config asks for {config.gate!r} with {heads}: compile with "
                             "the config the gates were made with, or delete the attribute first")
        return gate
    gate = NSAGate(hidden, heads, config, gate_dtype(config, attention), p.device if p is not None else None)
    setattr(attention, GATE_ATTR, gate)
    return gate
