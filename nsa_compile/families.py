"""Video-language model families of transformers, as data: tiny configs of the real architectures and their inputs.

The backend itself has no model-specific code path. This table only says how to *build* a small model of each
family (random weights, 2 language-model layers, a tiny vision tower) and a short video input in the family's
documented layout, for tests and ``scripts/coverage.py``. Everything a family differs in is a value here:

* ``pixels``: ``"patches"`` – Qwen2-VL-style flattened patches ``[t·h·w, C·tp·ps·ps]`` with ``video_grid_thw``
  (Qwen2/2.5/3-VL, GLM-4.1V, VideoLLaMA3); ``"frames"`` – ``pixel_values_videos [B, F, C, H, W]`` (LLaVA family).
* ``layout``: how the prompt marks the video (``span``: start, N video tokens, end; ``frames``: one group per
  temporal step, GLM-4.1V style with the *image* token id between video start/end tokens, or Qwen3-VL style with
  a timestamp and start/end per frame).
* ``ids``: the config names of the special token ids (``video_token_id`` vs ``video_token_index`` …).

The number of video tokens is not computed by a per-family formula: it is read from the model's own
``get_video_features`` (rows of its output), so the prompt always matches what the merge expects.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Special token ids of the tiny vocabulary (256 ids; text tokens are drawn from 0..199).
IMG, VID, START, END, IMG_START, IMG_END, VID_START, VID_END, EOS, PAD = range(240, 250)
VOCAB = 256
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# A tiny language model: hidden 64, 4 query heads over 2 KV heads (GQA 2), head dim 16, 2 layers.
_LM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS)
_MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])  # sums to head_dim / 2
_QWEN_IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=START, vision_end_token_id=END)
_LLAVA_IDS = dict(image_token_index=IMG, video_token_index=VID)
_GLM_IDS = dict(image_token_id=IMG, video_token_id=VID, image_start_token_id=IMG_START,
                image_end_token_id=IMG_END, video_start_token_id=VID_START, video_end_token_id=VID_END)
_CLIP_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)
_SIGLIP_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=56, patch_size=14)


@dataclass(frozen=True)
class Family:
    """How to build a tiny model of one transformers family and a short video input for it.

    Attributes:
        name: the family (transformers ``model_type``); model_class / config_class: transformers class names.
        text, vision, top: overrides of the text config, the vision config and the top-level config.
        pixels: ``"patches"`` or ``"frames"`` (see the module docstring); patch / temporal / merge: the patch size,
            temporal patch size and spatial merge of ``"patches"``; size: frame (H, W); frames: frames sampled.
        layout: ``"span"``, ``"glm_frames"`` or ``"qwen3_frames"``; stats: pixel (mean, std).
        extra: further forward inputs (name → value) the family's video path needs.
        note: what the coverage table says about the family beyond the numbers.
    """

    name: str
    model_class: str
    config_class: str
    text: dict
    vision: dict
    top: dict
    pixels: str = "patches"
    patch: int = 14
    temporal: int = 2
    merge: int = 2
    size: tuple[int, int] = (112, 112)
    frames: int = 4
    layout: str = "span"
    stats: tuple = CLIP
    extra: dict = field(default_factory=dict)
    note: str = ""


_QWEN_LM = {**_LM, "rope_parameters": _MROPE}
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", _QWEN_LM,
           dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14), _QWEN_IDS),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", _QWEN_LM,
           dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                fullatt_block_indexes=[1], window_size=56), _QWEN_IDS,
           extra={"second_per_grid_ts": torch.tensor([1.0])}),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig",
           {**_LM, "head_dim": 16, "rope_parameters": {**_MROPE, "mrope_interleaved": True}},
           dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                num_position_embeddings=64, deepstack_visual_indexes=[1]), _QWEN_IDS,
           patch=16, size=(128, 128), layout="qwen3_frames"),
    Family("glm4v", "Glm4vForConditionalGeneration", "Glm4vConfig",
           {**_LM, "rope_parameters": {**_MROPE, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}},
           dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, image_size=56),
           _GLM_IDS, layout="glm_frames"),
    Family("glm46v", "Glm46VForConditionalGeneration", "Glm46VConfig",
           {**_LM, "model_type": "glm4v_text",
            "rope_parameters": {**_MROPE, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}},
           dict(model_type="glm4v_vision", depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                out_hidden_size=64, image_size=56), _GLM_IDS, layout="glm_frames"),
    Family("glm4v_moe", "Glm4vMoeForConditionalGeneration", "Glm4vMoeConfig",
           {**_LM, "rope_parameters": {**_MROPE, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5},
            "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1},
           dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, image_size=56),
           _GLM_IDS, layout="glm_frames"),
    Family("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig",
           {**_LM, "head_dim": 16, "rope_parameters": {**_MROPE, "mrope_interleaved": True},
            "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
           dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                num_position_embeddings=64, deepstack_visual_indexes=[1]), _QWEN_IDS,
           patch=16, size=(128, 128), layout="qwen3_frames"),
    Family("video_llama_3", "VideoLlama3ForConditionalGeneration", "VideoLlama3Config",
           {**_LM, "model_type": "qwen2"},
           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14),
           dict(image_token_id=IMG, video_token_id=VID), temporal=1, size=(56, 56), frames=4, stats=HALF,
           extra={"video_merge_sizes": torch.tensor([2])}),
    Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig",
           {**_LM, "model_type": "qwen2"}, _SIGLIP_VISION, {**_LLAVA_IDS, "vision_feature_layer": -1},
           pixels="frames", size=(56, 56), frames=8, stats=HALF),
    Family("llava_next_video", "LlavaNextVideoForConditionalGeneration", "LlavaNextVideoConfig",
           {**_LM, "model_type": "llama"}, _CLIP_VISION, _LLAVA_IDS, pixels="frames", size=(56, 56), frames=8),
    Family("video_llava", "VideoLlavaForConditionalGeneration", "VideoLlavaConfig",
           {**_LM, "model_type": "llama"}, _CLIP_VISION, _LLAVA_IDS, pixels="frames", size=(56, 56), frames=4),
]}


# Video-capable families of transformers 5.23 not in FAMILIES, and why (rendered into docs/coverage.md).
NOT_COVERED: dict[str, str] = {
    "perception_lm": "not tested: its vision tower is a timm model (TimmWrapper) and timm is not installed here",
    "qwen2_5_omni, qwen3_omni_moe": "not attempted in the time available (thinker/talker with audio encoder)",
    "ernie4_5_vl_moe": "not attempted in the time available",
    "instructblipvideo": "not attempted in the time available (Q-Former query tokens stand for the video)",
    "internvl, smolvlm, llava, llava_next": "not tested: video frames enter as *image* tokens through an image merge "
                                           "(no video token id); they need NSAConfig(modalities=('video', 'image'))",
}


def build_model(name: str, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    """A randomly initialised model of family ``name`` (eval mode)."""
    import transformers

    fam = FAMILIES[name]
    config = getattr(transformers, fam.config_class)(text_config=dict(fam.text), vision_config=dict(fam.vision),
                                                     **fam.top)
    config._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(config).to(dtype).eval()
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model


def _pixels(fam: Family, video: torch.Tensor) -> dict:
    """The family's pixel inputs for a uint8 ``[F, H, W, 3]`` video."""
    x = video.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != fam.size:
        x = F.interpolate(x, size=fam.size, mode="bicubic", align_corners=False, antialias=True).round().clamp(0, 255)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in fam.stats)
    x = (x / 255.0 - mean) / std
    if fam.pixels == "frames":
        return {"pixel_values_videos": x[None].contiguous()}
    ps, tp, m = fam.patch, fam.temporal, fam.merge
    if pad := -x.shape[0] % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // tp, fam.size[0] // ps, fam.size[1] // ps
    # rows (t, h-block, w-block, h-in-block, w-in-block): each run of merge² rows is one merged token;
    # columns (channel, temporal, patch-row, patch-col)
    x = x.view(gt, tp, 3, gh // m, m, ps, gw // m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return {"pixel_values_videos": x.reshape(gt * gh * gw, 3 * tp * ps * ps).contiguous(),
            "video_grid_thw": torch.tensor([[gt, gh, gw]])}


def _video_token_count(model, pixels: dict, extra: dict) -> tuple[int, int]:
    """(video tokens, temporal groups) as the model's own ``get_video_features`` produces them."""
    inner = getattr(model, "model", model)  # the base model: the wrappers do not all forward every argument
    sig = inspect.signature(inner.get_video_features).parameters
    kwargs = {k: v for k, v in {**pixels, **extra}.items() if k in sig}
    with torch.no_grad():
        out = inner.get_video_features(**kwargs)
    feats = getattr(out, "pooler_output", None)
    feats = out if feats is None else feats
    feats = list(feats) if isinstance(feats, (tuple, list)) else [feats]
    hidden = model.get_input_embeddings().embedding_dim
    n = sum(f.numel() for f in feats) // hidden
    groups = int(pixels["video_grid_thw"][0, 0]) if "video_grid_thw" in pixels else 1
    return n, groups


def build_inputs(name: str, model, video: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Forward / generate inputs (batch 1): a few text tokens, the video in the family's prompt layout, more text.

    ``video``: uint8 ``[F, H, W, 3]`` (default: random frames at the family's size and frame count).
    """
    fam = FAMILIES[name]
    g = torch.Generator().manual_seed(seed)
    if video is None:
        video = torch.randint(0, 256, (fam.frames, *fam.size, 3), generator=g, dtype=torch.uint8)
    pixels = _pixels(fam, video)
    n, groups = _video_token_count(model, pixels, fam.extra)
    text = lambda k: torch.randint(0, 200, (k,), generator=g).tolist()  # noqa: E731
    per = n // groups
    if fam.layout == "glm_frames":  # the video's frames carry the *image* token id
        video_ids = [VID_START] + sum(([IMG_START] + [IMG] * per + [IMG_END] + text(1) for _ in range(groups)),
                                      []) + [VID_END]
        vid_tok = IMG
    elif fam.layout == "qwen3_frames":  # "<t seconds>" then start, tokens, end per temporal step
        video_ids = sum((text(2) + [START] + [VID] * per + [END] for _ in range(groups)), [])
        vid_tok = VID
    else:
        video_ids = [START] + [VID] * n + [END]
        vid_tok = VID
    ids = torch.tensor([text(6) + video_ids + text(8)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels, **fam.extra}
    fwd = inspect.signature(model.forward).parameters
    if "mm_token_type_ids" in fwd:
        inputs["mm_token_type_ids"] = (ids == vid_tok).long() * 2
    return {k: v for k, v in inputs.items() if k in fwd or k in ("input_ids", "attention_mask")}


def video_token_mask(name: str, inputs: dict) -> torch.Tensor:
    """[B, T] bool: the positions the family fills with video features (GLM-4.1V: image ids inside the video)."""
    fam = FAMILIES[name]
    ids = inputs["input_ids"]
    if fam.layout == "glm_frames":
        inside = torch.cumsum((ids == VID_START).long(), -1) > torch.cumsum((ids == VID_END).long(), -1)
        return (ids == IMG) & inside
    return ids == VID
