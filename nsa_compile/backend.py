"""The ``nsa`` backend for ``torch.compile``.

For every graph dynamo hands it, the backend (1) finds attention sites (`passes.attention`), (2) finds the graph's
video-mask source (`passes.video_mask`), (3) attaches a gate module to each language-model attention module of the
user's model (`gates`), (4) rewrites the sites into ``nsa_compile::nsa_attention`` on a copy of the graph
(`passes.rewrite`), and (5) compiles the copy with AOTAutograd, so forward and backward (gates included) run
compiled. Graphs with nothing to rewrite and no mask to record are returned as they are.

Graph breaks are the normal case: the graph that merges vision features (and so knows the video mask) is usually
not the graph of the decoder layers. A graph with a mask source outputs the mask as well, the backend's wrapper
records it in a per-thread slot, and graphs whose attention has no source of their own read it from there (the
mask of the tokens of the current forward: the last Tm key positions, see `kernels.nsa_reference`). In one
fullgraph capture (as export uses) the mask is wired inside the graph and nothing is recorded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import warnings

import torch
from torch import fx, nn

from .config import NSAConfig
from .gates import install_gate
from .kernels.common import NSAStrictError
from .kernels.nsa import strict_kernels
from .passes.attention import _val, find_attention_sites, skip_reason
from .passes.rewrite import Rewrite, rewrite_graph
from .passes.video_mask import find_video_mask
from .report import CompileReport, GraphRecord, SiteRecord

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ runtime video mask
class _MaskSlot(threading.local):
    recorded: torch.Tensor | None = None
    override: torch.Tensor | None = None


_SLOT = _MaskSlot()


class VideoMaskMissing(RuntimeError):
    """A rewritten graph ran before any video mask was recorded for this forward."""


def record_video_mask(mask: torch.Tensor, kind: str = "merge") -> None:
    """Store the [B, T] bool video mask of the current forward's tokens (called by compiled graphs).

    A merge's mask adds to what this forward recorded before (merges of images and of videos sit in different
    graphs); a mask read from ``input_ids`` (``kind="input_ids"``, a forward's first graph) replaces it."""
    prev = _SLOT.recorded
    if kind == "merge" and prev is not None and prev.shape == mask.shape:
        mask = prev | mask
    _SLOT.recorded = mask


def _warn_without_video(mask: torch.Tensor, strict: bool = False) -> None:
    """Warn when rewritten attention runs over a prefill without video tokens (it computes dense attention).
    Checked where attention uses the mask: graphs before a merge may see an empty fallback mask first.

    Raises:
        NSAStrictError: with ``strict``, instead of the warning.
    """
    if mask.shape[-1] > 1 and not bool(mask.any()):
        msg = "nsa-compile: a sequence without video tokens: its attention runs dense"
        if strict:
            raise NSAStrictError(msg + " (NSAConfig.strict)")
        warnings.warn(msg, stacklevel=3)


@contextlib.contextmanager
def video_mask(mask: torch.Tensor):
    """Set the video mask by hand for the forwards inside the ``with`` block (bool [B, T] over the tokens of each
    forward), for models that never show ``input_ids`` or a vision merge to the compiler (e.g. called with
    ``inputs_embeds``). It takes precedence over recorded masks."""
    previous, _SLOT.override = _SLOT.override, mask.bool()
    try:
        yield
    finally:
        _SLOT.override = previous


def current_video_mask() -> torch.Tensor:
    """The mask a rewritten graph without its own mask source uses.

    Raises:
        VideoMaskMissing: none recorded in this thread.
    """
    mask = _SLOT.override if _SLOT.override is not None else _SLOT.recorded
    if mask is None:
        raise VideoMaskMissing(
            "nsa-compile: no video mask for this forward: no compiled graph showed input_ids or a vision-feature "
            "merge. Call the model with input_ids, or wrap the call in `with nsa_compile.video_mask(mask):`.")
    return mask


# ------------------------------------------------------------------------------------------ module resolution
_TOKEN = re.compile(r"\.([A-Za-z_]\w*)|\.(\d+)|\[(\d+)\]|\['([^']+)'\]")


def _frame_locals() -> dict:
    """Locals of the frame dynamo is compiling (internal API, tested on every supported torch)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        return dict(tx.f_locals) if tx is not None else {}
    except Exception:  # noqa: BLE001 - not inside a dynamo compile (e.g. a hand-made GraphModule)
        return {}


def _guard_identity(path: str, f_locals: dict) -> None:
    """Make dynamo's guards of the frame being compiled check the identity of the local that the module path
    ``L['name']...`` starts from (internal API, as `_frame_locals`).

    The compiled graph closes over the gates of *these* modules. Without the guard, dynamo reuses the graph for
    another instance of the same class (with ``inline_inbuilt_nn_modules`` it guards parameters as inputs, not
    the module's identity; and ``torch.compile(backend="nsa")`` with equal options counts as the same backend), so
    a second model, or a second layer running the same frame, would read the first one's gates."""
    m = re.match(r"L\['([^']+)'\]", path)
    if not m or not isinstance(f_locals.get(m.group(1)), nn.Module):
        return
    try:
        from torch._dynamo.guards import GuardBuilder
        from torch._dynamo.source import LocalSource
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        if tx is not None:
            tx.output.guards.add(LocalSource(m.group(1)).make_guard(GuardBuilder.ID_MATCH))
    except Exception as e:  # noqa: BLE001 - an internal API moved: say so rather than fail the compile
        log.warning("nsa: could not add an identity guard on %s (%s): do not compile two models of one class with "
                    "torch.compile(backend='nsa') in one process; nsa_compile.compile keeps them apart", path, e)


def resolve_module(path: str, f_locals: dict, root: nn.Module | None) -> nn.Module | None:
    """The module named by an ``nn_module_stack`` path such as ``L['self'].model.layers.0.self_attn``.

    Looked up from the compiled frame's locals, else matched as a suffix of ``root``'s module names.
    """
    m = re.match(r"L\['([^']+)'\]", path)
    if m and m.group(1) in f_locals:
        obj = f_locals[m.group(1)]
        try:
            for tok in _TOKEN.finditer(path[m.end():]):
                name = next(g for g in tok.groups() if g is not None)
                obj = obj[int(name)] if tok.group(3) is not None else getattr(obj, name)
            if isinstance(obj, nn.Module):
                return obj
        except (AttributeError, IndexError, KeyError, TypeError):
            pass
    if root is not None:
        rel = path[m.end():].lstrip(".") if m else path
        for name, mod in root.named_modules():
            if name == rel or name.endswith("." + rel):
                return mod
    return None


def _model_token_ids(f_locals: dict, root: nn.Module | None) -> tuple[set[int], set[int]]:
    """``video_token_id`` / ``image_token_id`` of any model config in reach."""
    video, image = set(), set()
    for obj in list(f_locals.values()) + [root]:
        cfg = getattr(obj, "config", None) if isinstance(obj, nn.Module) else None
        for c in (cfg, getattr(cfg, "text_config", None)):
            for attr, out in (("video_token_id", video), ("video_token_index", video), ("image_token_id", image),
                              ("image_token_index", image)):
                v = getattr(c, attr, None)
                if isinstance(v, int):
                    out.add(v)
    return video, image


# ------------------------------------------------------------------------------------------ strict mode
def _reference_reason(site) -> str:
    """Why the op of ``site`` would run the plain-PyTorch reference rather than the Triton kernels on a CUDA
    device ("" when it runs the kernels, or when the site is not on CUDA: there the reference is the path)."""
    from .kernels.nsa import use_triton
    q, v = _val(site.q), _val(site.v)
    if q is None or not q.is_cuda:
        return ""
    # an attn_mask is inspected at run time (`kernels.nsa.key_padding`: causal key padding runs the kernels, any
    # other mask the reference, with a warning); here only what is known from shapes and dtypes
    if use_triton(q, None, v):
        return ""
    dims = sorted({int(q.shape[-1])} | ({int(v.shape[-1])} if v is not None else set()))
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the kernels take fp16, bf16, fp32)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if q.dtype == torch.float32 and max(dims) > 128 and min(dims) >= 16:
        return f"head dim {dims} in fp32 (the kernels take fp32 up to head dim 128; use bf16 or fp16)"
    return f"head dim {dims} outside what the kernels take"


class _CallCount(threading.local):
    def __init__(self):
        self.stack: list[list] = []  # [backend, graphs run] per `compile` call in progress, innermost last


_CALLS = _CallCount()


def _graph_ran(backend) -> None:
    for entry in _CALLS.stack:
        if entry[0] is backend:
            entry[1] += 1


# ------------------------------------------------------------------------------------------ the backend
# Skips that are the normal case (vision encoders, bidirectional attention) and get no warning.
_EXPECTED_SKIPS = ("vision-encoder attention", "non-causal attention")

class NSABackend:
    """A ``torch.compile`` backend object; one per compiled model (its `report` covers all of that model's graphs).

    Args:
        config: the `NSAConfig` (default: the ``videonsa`` preset).
        model: the user's model, when known (``nsa_compile.compile``); gates are attached to its modules.
    """

    def __init__(self, config: NSAConfig | None = None, model: nn.Module | None = None):
        self.config = config or NSAConfig.preset("videonsa")
        self.model = model
        self.report = CompileReport(self.config)
        self.video_ids: set[int] = {self.config.video_token_id} if self.config.video_token_id is not None else set()
        self.image_ids: set[int] = set()

    def rewrite(self, gm: fx.GraphModule) -> Rewrite | None:
        """Analyse ``gm`` (a graph dynamo captured), attach gates, record what was found in the report, and return
        the rewritten copy, or None when the graph has nothing to rewrite and no video mask to record.

        This is the whole pass without compilation; `__call__` compiles its result, `nsa_compile.export` traces it.
        Must run while dynamo compiles the frame (to reach the attention modules), or with ``model`` given.
        """
        cfg = self.config
        f_locals = _frame_locals()
        if cfg.video_token_id is None:
            v, i = _model_token_ids(f_locals, self.model)
            self.video_ids |= v
            self.image_ids |= i
        record = GraphRecord(len(self.report.graphs), len(gm.graph.nodes))
        self.report.graphs.append(record)

        source, record.notes = find_video_mask(gm, cfg.modalities, self.video_ids, self.image_ids)
        if source is not None and source.kind == "merge":
            self.video_ids |= set(source.token_ids)
        can_find_video = bool(self.video_ids) or source is not None or _SLOT.override is not None

        matched = []
        for site in find_attention_sites(gm):
            q, k = _val(site.q), _val(site.k)
            rec = SiteRecord(record.index, site.node.name, site.form, site.module, "skipped",
                             q_heads=int(q.shape[1]) if q is not None else 0,
                             kv_heads=int(k.shape[1]) if k is not None else 0)
            record.sites.append(rec)
            rec.reason = skip_reason(site, can_find_video) or ""
            module = None
            if not rec.reason:
                module = resolve_module(site.module, f_locals, self.model)
                if module is None:
                    rec.reason = f"module {site.module} not reachable from the compiled frame"
            if not rec.reason and cfg.strict and (why := _reference_reason(site)):
                raise NSAStrictError(f"nsa-compile: attention {site.module or site.node.name} would run the "
                                     f"plain-PyTorch reference instead of the Triton kernels: {why} (NSAConfig.strict)")
            if rec.reason:
                log.info("nsa: %s skipped: %s", site.node.name, rec.reason)
                if not rec.reason.startswith(_EXPECTED_SKIPS):
                    msg = f"nsa-compile: attention {site.module or site.node.name} stays dense: {rec.reason}"
                    if cfg.strict:
                        raise NSAStrictError(msg + " (NSAConfig.strict)")
                    warnings.warn(msg, stacklevel=3)
                continue
            _guard_identity(site.module, f_locals)
            hidden = _val(site.hidden)
            gate = install_gate(module, int(hidden.shape[-1]), int(q.shape[1]), cfg)
            rec.status = "rewritten"
            rec.mask = site.mask.kind + (f": {site.mask.why}" if site.mask.why else "") if site.mask else ""
            rec.module_id = id(module)
            matched.append((site, gate))

        if source is not None:
            record.mask_source = source.kind + ": " + source.description
        elif matched:
            record.mask_source = "runtime (recorded by an earlier graph)"
        record.records_mask = source is not None
        if not matched and source is None:
            return None
        rw = rewrite_graph(gm, matched, source, cfg, record_mask=source is not None)
        if rw.needs_runtime_mask:
            rw.example_mask = self._example_mask(matched)
        rw.source_kind = source.kind if source is not None else ""
        return rw

    def __call__(self, gm: fx.GraphModule, example_inputs, **_ignored):
        rw = self.rewrite(gm)
        if rw is None:
            inner = self._inner(gm, example_inputs, rewritten=False)

            def run_unchanged(*args):
                _graph_ran(self)
                return inner(*args)

            return run_unchanged
        extra = [rw.example_mask] if rw.needs_runtime_mask else []
        compiled = self._inner(rw.gm, list(example_inputs) + extra + rw.gate_params)
        report = self.report
        params = rw.gate_params

        def run(*args):
            _graph_ran(self)
            extras = [current_video_mask()] if rw.needs_runtime_mask else []
            extras += params
            with strict_kernels(self.config.strict):
                out = compiled(*args, *extras)  # dynamo's calling convention: unboxed
            mask = extras[0] if rw.needs_runtime_mask else None
            if rw.records_mask:
                mask = out[-1]
                out = type(out)(out[:-1]) if isinstance(out, tuple) else out[:-1]
                if _SLOT.override is None:
                    record_video_mask(mask, rw.source_kind)
                    mask = _SLOT.recorded
                report.last_video_mask = mask if mask.shape[-1] > 1 else report.last_video_mask
            if rw.sites and mask is not None:
                _warn_without_video(mask, self.config.strict)
            return out

        return run

    def _example_mask(self, matched) -> torch.Tensor:
        q = _val(matched[0][0].q)
        B, T = (s if isinstance(s, int) else s.node.hint for s in (q.shape[0], q.shape[2]))
        recorded = _SLOT.override if _SLOT.override is not None else _SLOT.recorded
        if recorded is not None and tuple(recorded.shape) == (B, T):
            return recorded
        return torch.zeros(B, T, dtype=torch.bool, device=q.device)

    def _inner(self, gm: fx.GraphModule, example_inputs, rewritten: bool = True):
        """Compile a graph after the rewrite: Inductor, or AOTAutograd running the FX graphs as they are (a graph
        we did not rewrite then runs untouched)."""
        if self.config.inner_backend == "eager" and not rewritten:
            return gm.forward
        backend = "inductor" if self.config.inner_backend == "inductor" else "aot_eager"
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)


_BACKENDS: dict[str, NSABackend] = {}


def nsa_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **_ignored):
    """Entry point of ``torch.compile(model, backend="nsa", options={...})``.

    ``options`` are `NSAConfig` fields (and ``"preset"``); one `NSABackend` (and report) is kept per distinct
    options, reachable through `last_report`.
    """
    config = NSAConfig.from_dict(options or {"preset": "videonsa"})
    key = config.to_json()
    backend = _BACKENDS.setdefault(key, NSABackend(config))
    _BACKENDS["__last__"] = backend
    return backend(gm, example_inputs)


def last_report() -> CompileReport | None:
    """The report of the `NSABackend` used last through ``backend="nsa"``."""
    b = _BACKENDS.get("__last__")
    return b.report if b is not None else None


def compile(model, config: NSAConfig | None = None, **torch_compile_kwargs):
    """``torch.compile(model, backend=NSABackend(config, model))``; the result carries ``nsa_report``.

    Args:
        model: a video-language model (``nn.Module``) or its bound ``forward`` (compile ``model.forward`` and assign
            it back to keep ``model.generate`` on the compiled path, as with transformers' own compile recipe).
        config: default ``NSAConfig.preset("videonsa")``.
        torch_compile_kwargs: passed to ``torch.compile`` (e.g. ``dynamic``, ``fullgraph``).
    Returns:
        the compiled module or function; its ``nsa_report`` is the `CompileReport`, filled as graphs compile.
    """
    root = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    backend = NSABackend(config, root if isinstance(root, nn.Module) else None)
    compiled = torch.compile(model, backend=backend, **torch_compile_kwargs)
    # Each top-level call starts without a recorded mask, so a forward that shows the compiler no mask source
    # raises VideoMaskMissing instead of reusing the previous forward's mask; and a call that reached none of our
    # graphs (dynamo ran the frame eagerly, e.g. past its recompile limit) is reported, not silently dense.
    if isinstance(compiled, nn.Module):
        compiled.register_forward_pre_hook(lambda *_: _call_starts(backend))
        # always_call: the limits are restored and the count popped when the forward raises too (output None)
        compiled.register_forward_hook(lambda _m, _a, out: _call_ends(backend, check=out is not None),
                                       always_call=True)
    else:
        inner = compiled

        @functools.wraps(model)
        def compiled(*args, **kwargs):
            _call_starts(backend)
            try:
                out = inner(*args, **kwargs)
            except BaseException:
                _call_ends(backend, check=False)  # the error says what went wrong, not a note on dense attention
                raise
            _call_ends(backend)
            return out

    compiled.nsa_report = backend.report
    return compiled


# Graph breaks multiply the frames dynamo compiles, and grad mode, autocast and new shapes each recompile them:
# past dynamo's default limit of 8 per frame it would run a frame eagerly, i.e. with dense attention. Our calls
# raise the limit while they run (and only then).
_RECOMPILE_LIMIT = 64


def _call_starts(backend: NSABackend | None = None) -> None:
    _forget_mask()
    _CALLS.stack.append([backend, 0])
    stack = contextlib.ExitStack()
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < _RECOMPILE_LIMIT * (8 if "accumulated" in name else 1):
            stack.enter_context(cfg.patch(**{name: _RECOMPILE_LIMIT * (8 if "accumulated" in name else 1)}))
    _SLOT.limits = getattr(_SLOT, "limits", []) + [stack]


def _call_ends(backend: NSABackend, check: bool = True) -> None:
    """Restore the recompile limits; warn (raise with ``strict``) when the call ran none of our graphs.

    Raises:
        NSAStrictError: ``backend.config.strict`` and dynamo ran the whole call eagerly (dense attention).
    """
    limits = getattr(_SLOT, "limits", [])
    if limits:
        limits.pop().close()
    ran = _CALLS.stack.pop()[1] if _CALLS.stack else 1
    if check and (not backend.report.graphs or not ran):
        msg = ("nsa-compile: this call ran without any graph compiled by the nsa backend (dynamo ran it eagerly, "
               "e.g. after reaching its recompile limit), so attention stayed dense; call torch._dynamo.reset() "
               "before compiling the same model again")
        if backend.config.strict:
            raise NSAStrictError(msg + " (NSAConfig.strict)")
        warnings.warn(msg, stacklevel=3)


def _forget_mask() -> None:
    _SLOT.recorded = None
