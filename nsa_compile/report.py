"""The report of an NSA compile: attention sites found, rewritten and skipped (with the reason), where each graph's
video mask comes from, and, after a run, video tokens per sequence and the attention budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .config import NSAConfig
from .kernels.common import attention_budget


@dataclass
class SiteRecord:
    """One attention call: ``status`` is ``"rewritten"`` or ``"skipped"``; ``reason`` says why it was skipped;
    ``mask`` what its ``attn_mask`` became in the op (`passes.attention.analyse_mask`): ``""`` (none), ``"causal"``
    (dropped), ``"causal+keys"`` (only the per-key terms passed), ``"opaque: why"`` (passed whole, checked at run
    time)."""

    graph: int
    node: str
    form: str
    module: str
    status: str
    reason: str = ""
    q_heads: int = 0
    kv_heads: int = 0
    module_id: int = 0
    mask: str = ""


@dataclass
class GraphRecord:
    """One graph dynamo handed the backend: its attention sites and its video-mask source
    (``"merge"``, ``"input_ids"``, ``"runtime"`` — the mask recorded by an earlier graph — or ``""``)."""

    index: int
    nodes: int
    sites: list[SiteRecord] = field(default_factory=list)
    mask_source: str = ""
    records_mask: bool = False
    notes: list[str] = field(default_factory=list)


class CompileReport:
    """Everything one `NSABackend` did, over all the graphs of one compiled model (graph breaks and recompiles
    included), plus the video mask of the last run."""

    def __init__(self, config: NSAConfig):
        self.config = config
        self.graphs: list[GraphRecord] = []
        self.last_video_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------ views
    @property
    def sites(self) -> list[SiteRecord]:
        return [s for g in self.graphs for s in g.sites]

    @property
    def rewritten_modules(self) -> list[str]:
        """Distinct attention modules rewritten into NSA (a layer compiled twice, e.g. for prefill and decode,
        counts once), by their shortest path with the leading ``L['…']`` frame prefix dropped."""
        paths: dict[int, str] = {}
        for s in self.sites:
            if s.status == "rewritten":
                p = _strip(s.module)
                paths[s.module_id] = min(paths.get(s.module_id, p), p, key=len)
        return sorted(paths.values(), key=_natural)

    @property
    def skipped(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.status == "skipped"]

    def budget(self) -> dict | None:
        """Attention budget of the last prefill seen (see `kernels.attention_budget`), or None before any run."""
        m = self.last_video_mask
        if m is None:
            return None
        c = self.config
        return attention_budget(m, m.shape[1], c.block_size, c.block_stride, c.selection_block_size, c.top_n,
                                c.window_size)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "preset": self.config.name,
            "graphs": len(self.graphs),
            "sites_found": len(self.sites),
            "sites_rewritten": sum(s.status == "rewritten" for s in self.sites),
            "sites_skipped": len(self.skipped),
            "rewritten_modules": self.rewritten_modules,
            "skip_reasons": _count(s.reason for s in self.skipped),
            "attn_masks": _count(s.mask for s in self.sites if s.status == "rewritten" and s.mask),
            "mask_sources": [{"graph": g.index, "source": g.mask_source, "records": g.records_mask}
                             for g in self.graphs if g.mask_source or g.records_mask],
            "budget": self.budget(),
            "sites": [asdict(s) for s in self.sites],
        }

    def format(self) -> str:
        d = self.to_dict()
        lines = [f"NSA compile report (preset {d['preset']}): {d['graphs']} graphs, {d['sites_found']} attention "
                 f"sites, {d['sites_rewritten']} rewritten, {d['sites_skipped']} skipped"]
        lines.append(f"  rewritten layers ({len(d['rewritten_modules'])}):")
        lines += [f"    {m}" for m in d["rewritten_modules"]]
        if d["skip_reasons"]:
            lines.append("  skipped:")
            lines += [f"    {n} × {r}" for r, n in d["skip_reasons"].items()]
        if d["attn_masks"]:
            lines.append("  attn_mask of rewritten sites (causal: not needed, dropped; causal+keys: only the per-key "
                         "padding passed; opaque: passed whole, checked at run time):")
            lines += [f"    {n} × {m}" for m, n in d["attn_masks"].items()]
        for g in self.graphs:
            if g.mask_source or g.records_mask or g.notes:
                what = g.mask_source or "-"
                lines.append(f"  graph {g.index}: video mask from {what}" + (" (recorded for later graphs)"
                                                                              if g.records_mask else "")
                             + ("; " + "; ".join(g.notes) if g.notes else ""))
        b = d["budget"]
        if b is not None:
            lines.append(f"  video tokens per sequence: {b['video_tokens']}; attention budget {b['budget']:.1%} "
                         f"of dense ({b['nsa_scores']:.3g} of {b['dense_scores']:.3g} scores)")
        return "\n".join(lines)

    __str__ = format


def _strip(path: str) -> str:
    return path.split("]", 1)[1].lstrip(".") if path.startswith("L[") else path


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in s.replace("[", ".").replace("]", "").split(".")]


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out
