"""Find the video-token mask in a dynamo graph, from the graph's own data flow.

Video-language models merge vision features into the token embeddings, e.g. Qwen2.5-VL and LLaVA-OneVision do
``inputs_embeds.masked_scatter(mask[..., None].expand_as(inputs_embeds), video_features)`` with
``mask = input_ids == video_token_id``. We follow that merge: its mask argument, reduced to [B, T], marks the video
tokens; whether a merge carries video or images is read from its data flow (an ``== token_id`` comparison upstream of
the mask, or the names of the inputs it came from: ``pixel_values_videos``, ``video_embeds`` …). When the graph
holds no merge but does hold ``input_ids``, the mask is ``isin(input_ids, token ids)`` with the token ids of the
config (``NSAConfig.video_token_id``) or of the model config: the fallback.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

_EQ = {operator.eq, torch.eq, "eq", "__eq__"}
_MERGE = {"masked_scatter", torch.masked_scatter, torch.Tensor.masked_scatter}


@dataclass
class MaskSource:
    """Where a graph's video mask comes from.

    Attributes:
        kind: ``"merge"`` (masked_scatter of video features) or ``"input_ids"`` (token-id fallback).
        nodes: the merge masks ([B, T, …] bool) or the ``input_ids`` placeholder ([B, T] integer).
        token_ids: token ids compared with ``input_ids`` (``"input_ids"`` kind) or found upstream of the merges.
        description: for the report.
    """

    kind: str
    nodes: list[fx.Node]
    token_ids: tuple[int, ...]
    description: str


def _upstream(node: fx.Node, limit: int = 4000):
    seen, frontier = set(), [node]
    while frontier and len(seen) < limit:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        frontier.extend(n.all_input_nodes)


def _compared_ids(node: fx.Node) -> set[int]:
    """Integer constants compared with ``==`` upstream of ``node`` (``input_ids == video_token_id``)."""
    ids = set()
    for n in _upstream(node):
        if n.op in ("call_function", "call_method") and n.target in _EQ:
            ids.update(a for a in n.args if isinstance(a, int) and not isinstance(a, bool))
    return ids


def _names(node: fx.Node) -> str:
    return " ".join(n.name for n in _upstream(node) if n.op == "placeholder").lower()


def merge_modality(merge: fx.Node, video_ids: set[int], image_ids: set[int]) -> tuple[str, set[int]]:
    """``"video"``, ``"image"`` or ``"unknown"`` for one ``masked_scatter`` merge, and the ids compared upstream."""
    ids = _compared_ids(merge.args[1])
    if ids & video_ids:
        return "video", ids
    # Features that come from video inputs are video even when their placeholders carry the image token id
    # (GLM-4.1V fills video frames with image tokens): the features' names decide before the image id does.
    if "video" in _names(merge.args[2]):
        return "video", ids
    if ids & image_ids:
        return "image", ids
    names = _names(merge.args[2]) + " " + _names(merge.args[1])
    if "video" in names:
        return "video", ids
    if "image" in names or "pixel_values" in names:
        return "image", ids
    return "unknown", ids


def find_video_mask(gm: fx.GraphModule, modalities: tuple[str, ...], video_ids: set[int], image_ids: set[int]
                    ) -> tuple[MaskSource | None, list[str]]:
    """The video-mask source of ``gm`` (None when the graph shows none) and notes for the report.

    Args:
        modalities: token kinds counted as video (``NSAConfig.modalities``).
        video_ids, image_ids: known placeholder token ids (config / model config), possibly empty.
    """
    notes, masks, found_ids = [], [], set()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target in _MERGE and len(node.args) >= 3:
            kind, ids = merge_modality(node, video_ids, image_ids)
            notes.append(f"merge {node.name}: {kind}" + (f" (token ids {sorted(ids)})" if ids else ""))
            if kind in modalities:
                masks.append(node.args[1])
                found_ids |= ids
    if masks:
        return MaskSource("merge", masks, tuple(sorted(found_ids)), ", ".join(notes)), []
    ids = set(video_ids) | (set(image_ids) if "image" in modalities else set())
    for node in gm.graph.nodes:
        val = node.meta.get("example_value")
        if node.op == "placeholder" and "input_ids" in node.name and isinstance(val, torch.Tensor) \
                and val.dim() == 2 and not val.dtype.is_floating_point:
            if ids:
                return MaskSource("input_ids", [node], tuple(sorted(ids)), f"{node.name} == {sorted(ids)}"), notes
            notes.append(f"{node.name} present but no video token id known")
    return None, notes


def mask_from_merge(*masks: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: union of merge masks of shape [B, T] or [B, T, hidden]."""
    out = None
    for m in masks:
        m = m.bool()
        if m.dim() > 2:
            m = m.flatten(2).any(-1)
        out = m if out is None else out | m
    return out


def mask_from_input_ids(input_ids: torch.Tensor, token_ids: tuple[int, ...]) -> torch.Tensor:
    """[B, T] bool: ``input_ids`` equal to any of ``token_ids``."""
    return torch.isin(input_ids, torch.tensor(token_ids, device=input_ids.device, dtype=input_ids.dtype))
