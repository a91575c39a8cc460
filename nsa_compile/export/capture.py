"""Capture a model in one dynamo graph, rewrite its attention into the NSA op, and wrap the rewritten graph in an
``nn.Module`` that ``torch.export`` / ``torch.onnx.export`` can trace with dynamic batch and sequence axes.

The capture runs ``torch.compile(model, backend=<capture>, fullgraph=True)`` once on the example inputs, with the
requested axes marked dynamic. The capture backend calls `NSABackend.rewrite` (the same pass ``nsa_compile.compile``
runs, gates included) and keeps the rewritten ``GraphModule``. Dynamo's graph takes as placeholders the user's
tensors, the model's parameters and buffers, and symbolic sizes; `ExportModule` feeds them: user inputs from its
arguments, parameters and buffers from the model (so they keep their state-dict names and become ONNX
initialisers, the gate parameters among them), sizes from the inputs' shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..backend import NSABackend, video_mask as video_mask_context
from ..config import NSAConfig
from ..report import CompileReport

VIDEO_MASK_INPUT = "nsa_video_mask"


class ExportError(RuntimeError):
    """Export cannot proceed; the message names the cause and the way out."""


def write_atomically(path: str | os.PathLike, write) -> str:
    """Write ``path`` by ``write(tmp)`` into a fresh hidden folder beside it, then rename what ``write`` produced into
    place, the file ``path`` names last: ``path`` is never half-written, and a failing ``write`` (or check inside
    it) leaves any previous file whole and no temporary file behind. Files ``write`` puts beside ``tmp`` (ONNX
    external data, ``<name>.data``) keep their names, so the references inside the main file stay valid.

    Returns:
        the absolute path written.
    Raises:
        whatever ``write`` raises (nothing is renamed then); OSError from the file system.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder)
    try:
        write(os.path.join(tmp_dir, name))
        for f in sorted(os.listdir(tmp_dir), key=lambda f: f == name):  # the main file last
            os.replace(os.path.join(tmp_dir, f), os.path.join(folder, f))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


class LanguageModelForExport(nn.Module):
    """The language model of a transformers video-language model plus its LM head: ``(inputs_embeds, position_ids
    [, attention_mask]) → logits``.

    The vision encoder and the merge of its features into the token embeddings stay in PyTorch: compute
    ``inputs_embeds`` (text embeddings with the vision features scattered in), ``position_ids`` (Qwen's M-RoPE
    positions ``[3, B, T]``) and the video mask (``input_ids == video_token_id``) there (`language_model_inputs`
    does all three with the model's own code), then run the exported file. Only prefill without a KV cache is
    exported.

    Args:
        vlm: e.g. ``Qwen2_5_VLForConditionalGeneration`` (anything with ``.model.language_model`` and ``.lm_head``,
            or ``.language_model`` and ``.lm_head``).
        attention_mask: also take the ``[B, T]`` padding mask (1 = token, 0 = padding) as an input, for batches of
            padded sequences.
    """

    output_names = ("logits",)

    def __init__(self, vlm: nn.Module, attention_mask: bool = False):
        super().__init__()
        inner = getattr(vlm, "model", vlm)
        lm = getattr(inner, "language_model", None)
        head = getattr(vlm, "lm_head", None)
        if lm is None or head is None:
            raise ExportError(f"{type(vlm).__name__} has no .model.language_model and .lm_head; pass the language "
                              "model as an nn.Module of its own to nsa_compile.export.to_onnx")
        self.language_model = lm
        self.lm_head = head
        self.config = getattr(vlm, "config", None)  # video_token_id etc. for the backend
        self.input_names = ("inputs_embeds", "position_ids") + (("attention_mask",) if attention_mask else ())
        #: dynamic axes of each input (export default).
        self.dynamic_axes = {"inputs_embeds": {0: "batch", 1: "sequence"}, "position_ids": {1: "batch", 2: "sequence"},
                             "attention_mask": {0: "batch", 1: "sequence"}}

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                  attention_mask=attention_mask, use_cache=False)
        return self.lm_head(out.last_hidden_state)


class _Stop(Exception):
    pass


def language_model_inputs(vlm: nn.Module, inputs: dict) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The export inputs of `LanguageModelForExport`, computed in PyTorch by the model itself: one forward of
    ``vlm`` on its processor outputs is stopped at the language model, whose ``inputs_embeds`` (vision features
    merged in) and ``position_ids`` (M-RoPE) are taken; the video mask is ``input_ids == video_token_id``.

    Returns:
        ((inputs_embeds [B, T, hidden], position_ids [3, B, T]), video_mask bool [B, T]).
    """
    inner = getattr(vlm, "model", vlm)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        raise ExportError(f"{type(vlm).__name__} has no .model.language_model")
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            vlm(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    embeds, position_ids = seen.get("inputs_embeds"), seen.get("position_ids")
    if embeds is None or position_ids is None:
        raise ExportError("the model did not call its language model with inputs_embeds and position_ids")
    if position_ids.dim() == 3 and position_ids.shape[0] == 4:  # text positions prepended (packed form)
        position_ids = position_ids[1:]
    video_id = getattr(getattr(vlm, "config", None), "video_token_id", None)
    mask = inputs["input_ids"] == video_id
    return (embeds.detach(), position_ids.detach().contiguous()), mask


@dataclass
class Captured:
    """What `capture` produced: a traceable module and how to call it.

    Attributes:
        module: `ExportModule`; call it with ``args`` (the user inputs, then the video mask when ``mask_input``).
        input_names / output_names: ONNX names of the module's inputs and outputs.
        dynamic_shapes: per input, ``{dim: axis name}`` (``torch.onnx.export``'s format).
        mask_input: the video mask is an input (the graph has no mask source of its own).
        report: the `CompileReport` of the rewrite (sites rewritten / skipped and why).
    """

    module: nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple
    mask_input: bool
    report: CompileReport
    config: NSAConfig
    graph_code: str = field(repr=False, default="")


class ExportModule(nn.Module):
    """Feeds a rewritten dynamo graph: placeholders come from the inputs, the model's parameters/buffers or the
    inputs' sizes (see `capture`). ``model`` is a submodule so that parameters keep their names."""

    def __init__(self, graph_module: fx.GraphModule, model: nn.Module, plan: list[tuple], constants: dict,
                 drop_last_output: bool):
        super().__init__()
        self.graph_module = graph_module
        self.model = model
        self.plan = plan
        for name, value in constants.items():
            self.register_buffer(name, value, persistent=False)
        self.drop_last_output = drop_last_output

    def forward(self, *inputs):
        args = []
        for kind, a, b in self.plan:
            if kind == "input":
                args.append(inputs[a])
            elif kind == "parameter":
                args.append(self.model.get_parameter(a))
            elif kind == "buffer":
                args.append(self.model.get_buffer(a))
            elif kind == "constant":
                args.append(getattr(self, a))
            elif kind == "size":
                args.append(inputs[a].shape[b])
            elif kind == "stride":
                args.append(inputs[a].stride(b))
            else:  # "value": a Python number dynamo lifted
                args.append(a)
        out = self.graph_module(*args)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        if self.drop_last_output:
            out = out[:-1]
        out = [o for o in out if isinstance(o, torch.Tensor)]
        return out[0] if len(out) == 1 else tuple(out)


class _Root(nn.Module):
    """Calls the model from outside, so that dynamo records the model's own module path (an attention layer
    exported alone is then found like one inside a model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _signature_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:n]]
    except (TypeError, ValueError):
        names = []
    return names + [f"input_{i}" for i in range(len(names), n)]


def _normalise_inputs(model: nn.Module, example_inputs) -> tuple[list[str], list, bool]:
    """(names, values, as_kwargs) of the example inputs (a tensor, a tuple of positional inputs or a dict)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        items = [(k, v) for k, v in example_inputs.items() if v is not None]
        return [k for k, _ in items], [v for _, v in items], True
    if isinstance(example_inputs, (tuple, list)):
        n = len(example_inputs)
        names = list(getattr(model, "input_names", ()) or ())[:n]
        names += _signature_names(model, n)[len(names):]
        return names, list(example_inputs), False
    raise ExportError(f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs; got "
                      f"{type(example_inputs).__name__}")


def default_dynamic_axes(model: nn.Module, names: list[str], values: list) -> dict[str, dict[int, str]]:
    """The model's ``dynamic_axes`` attribute when it has one, else dims 0 (``batch``) and 1 (``sequence``) of
    every tensor input of rank ≥ 2 (the ``[B, T, …]`` layout of language-model inputs)."""
    own = getattr(model, "dynamic_axes", None)
    if isinstance(own, dict):
        return {k: dict(v) for k, v in own.items() if k in names}
    return {n: {0: "batch", 1: "sequence"} for n, v in zip(names, values)
            if isinstance(v, torch.Tensor) and v.dim() >= 2}


def _check_axes(names, values, axes: dict[str, dict[int, str]], video_mask) -> dict[str, int]:
    """Validate the dynamic-axes spec against the inputs; returns each axis name's example size."""
    sizes: dict[str, int] = {}
    for name, spec in axes.items():
        if name not in names:
            raise ExportError(f"dynamic axes name an input {name!r} that the model does not take; inputs: {names}")
        value = values[names.index(name)]
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"dynamic axes given for {name!r}, which is not a tensor")
        for dim, axis in spec.items():
            if not -value.dim() <= dim < value.dim():
                raise ExportError(f"dynamic axis {axis!r} names dim {dim} of {name!r}, which has shape "
                                  f"{tuple(value.shape)}")
            size = int(value.shape[dim])
            if sizes.setdefault(axis, size) != size:
                raise ExportError(f"dynamic axis {axis!r} has size {sizes[axis]} in one input and {size} in "
                                  f"{name!r} (dim {dim}); one axis name must mean one size")
    if video_mask is not None:
        for axis, dim in (("batch", 0), ("sequence", 1)):
            if axis in sizes and int(video_mask.shape[dim]) != sizes[axis]:
                raise ExportError(f"video_mask {tuple(video_mask.shape)} does not match the {axis} axis of the "
                                  f"inputs ({sizes[axis]}): pass the [batch, sequence] mask of these tokens")
    return sizes


def _repeat_to_two(values, names, axes, video_mask):
    """Dynamo specialises sizes 0 and 1: an axis meant to be dynamic whose example size is 1 is repeated to 2."""
    ones = set()
    for name, spec in axes.items():
        v = values[names.index(name)]
        for dim, axis in spec.items():
            if v.shape[dim] == 1:
                ones.add(axis)
    if not ones:
        return values, video_mask
    values = list(values)
    for name, spec in axes.items():
        i = names.index(name)
        for dim, axis in spec.items():
            if axis in ones:
                values[i] = torch.cat([values[i], values[i]], dim=dim)
    if video_mask is not None:
        for axis, dim in (("batch", 0), ("sequence", 1)):
            if axis in ones:
                video_mask = torch.cat([video_mask, video_mask], dim=dim)
    return values, video_mask


def capture(model: nn.Module, example_inputs, config: NSAConfig | None = None, video_mask: torch.Tensor | None = None,
            dynamic_axes: dict[str, dict[int, str]] | None = None, dynamic: bool = True) -> Captured:
    """Capture ``model`` on ``example_inputs`` in one graph, rewrite its attention into the NSA op, and return a
    module for ``torch.export`` (see module docs).

    Args:
        model: the module to export (e.g. `LanguageModelForExport`, or a single attention layer's module).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        config: `NSAConfig` (default ``videonsa``). Gates already attached by an earlier ``nsa_compile.compile`` with
            the same config are reused (trained values are exported).
        video_mask: bool [B, T] of the example tokens, for a model that does not show the compiler where its video
            tokens are (e.g. called with ``inputs_embeds``); the exported file then takes it as input
            ``nsa_video_mask``.
        dynamic_axes: ``{input name: {dim: axis name}}``; default `default_dynamic_axes`. The video mask input gets
            ``{0: "batch", 1: "sequence"}``.
        dynamic: False exports fixed shapes.
    Raises:
        ExportError: no attention was rewritten, a graph break, an axis that cannot be dynamic, bad inputs.
    """
    config = config or NSAConfig.preset("videonsa")
    # an exported graph is a prefill, where sparse and dense decode are the same op: export the one ONNX knows
    config = dataclasses.replace(config, decode="dense")
    names, values, as_kwargs = _normalise_inputs(model, example_inputs)
    if any(n in ("past_key_values", "cache_position") for n in names):
        raise ExportError("export covers prefill without a KV cache: drop past_key_values / cache_position from "
                          "the example inputs (decode steps keep dense attention for text queries anyway)")
    axes = (dynamic_axes if dynamic_axes is not None else default_dynamic_axes(model, names, values)) if dynamic \
        else {}
    if video_mask is not None:
        video_mask = video_mask.bool()
        if video_mask.dim() != 2:
            raise ExportError(f"video_mask must be bool [batch, sequence]; got shape {tuple(video_mask.shape)}")
    _check_axes(names, values, axes, video_mask)
    values, video_mask = _repeat_to_two(values, names, axes, video_mask)

    # fresh tensor objects so that marking dims dynamic leaves the caller's tensors alone
    values = [v.detach() if isinstance(v, torch.Tensor) else v for v in values]
    for name, spec in axes.items():
        for dim in spec:
            torch._dynamo.mark_dynamic(values[names.index(name)], dim)

    gates_before = sum(1 for m in model.modules() if hasattr(m, "nsa_gate"))
    backend = NSABackend(config, model)
    graphs: list[tuple[fx.GraphModule, list, object]] = []

    def capture_backend(gm: fx.GraphModule, example_values, **_):
        graphs.append((gm, list(example_values), backend.rewrite(gm)))
        return gm.forward

    was_training = model.training
    model.eval()
    torch._dynamo.reset()  # a fresh capture: no cached graph of another backend answers this call
    compiled = torch.compile(_Root(model), backend=capture_backend, fullgraph=True,
                             dynamic=None if dynamic else False)
    mask_ctx = video_mask_context(video_mask) if video_mask is not None else contextlib.nullcontext()
    try:
        with torch.no_grad(), mask_ctx:
            compiled(**dict(zip(names, values))) if as_kwargs else compiled(*values)
    except Exception as e:  # noqa: BLE001 - translated into the ways out below
        raise _capture_error(e, axes) from e
    finally:
        model.train(was_training)
        torch._dynamo.reset()
    if len(graphs) != 1:
        raise ExportError(f"dynamo produced {len(graphs)} graphs; export needs the model in one graph")
    gm, example_values, rw = graphs[0]
    sites = backend.report.sites
    for s in sites:  # module paths relative to the user's model, not to the capture wrapper
        if s.module.startswith("L['self'].model."):
            s.module = "L['self']." + s.module[len("L['self'].model."):]
    if rw is None or not any(s.status == "rewritten" for s in sites):
        reasons = "; ".join(sorted({s.reason for s in sites if s.reason})) or "no attention found in the graph"
        hint = "" if video_mask is not None else (" Models called without input_ids or a vision merge need the "
                                                   "video tokens: pass video_mask=[batch, sequence] bool.")
        raise ExportError(f"the model was not rewritten into NSA: nothing to export ({reasons}).{hint} Check "
                          "nsa_compile.compile(model, config).nsa_report on the same inputs.")

    if config.gate != "constant" and sum(1 for m in model.modules() if hasattr(m, "nsa_gate")) > gates_before:
        warnings.warn("nsa-compile export: gates were attached now, at their initial values (gate_init): the file "
                      "holds NSA before any fine-tuning. To export trained gates, export the model you trained (its "
                      "nsa_gate modules are reused with the same config).", stacklevel=3)
    plan, constants = _plan(rw.gm, example_values + ([rw.example_mask] if rw.needs_runtime_mask else [])
                            + list(rw.gate_params), model, names, values)
    module = ExportModule(rw.gm, model, plan, constants, rw.records_mask)
    args = tuple(values)
    input_names = list(names)
    dyn = [dict(axes.get(n, {})) for n in names]
    if rw.needs_runtime_mask:
        if video_mask is None:
            raise ExportError("the graph needs the video mask as an input: pass video_mask=[batch, sequence] bool")
        args += (video_mask,)
        input_names.append(VIDEO_MASK_INPUT)
        dyn.append({0: "batch", 1: "sequence"} if dynamic else {})
    out_names = list(getattr(model, "output_names", ()) or ())
    with torch.no_grad():
        out = module(*args)
    n_out = 1 if isinstance(out, torch.Tensor) else len(out)
    out_names = out_names[:n_out] if len(out_names) >= n_out else [f"output_{i}" for i in range(n_out)]
    return Captured(module, args, input_names, out_names, tuple(dyn), rw.needs_runtime_mask, backend.report, config,
                    rw.gm.code)


def _capture_error(e: Exception, axes) -> Exception:
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError
    chain, seen = [], set()
    x = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, ExportError):
            return x
        from ..kernels import NSAInputError
        if isinstance(x, NSAInputError):
            return ExportError(f"the NSA op cannot take these inputs: {x}")
        if isinstance(x, ValueError) and "already has an nsa_gate" in str(x):
            return ExportError(f"{x} (export with the NSAConfig the model was trained with)")
    for x in chain:
        if isinstance(x, ConstraintViolationError) or "ConstraintViolation" in type(x).__name__:
            return ExportError(
                "an axis marked dynamic cannot be dynamic in this model (the NSA op and the model need head counts, "
                f"head_dim and hidden size fixed; only batch and sequence can vary). Axes asked: {axes}. Mark only "
                f"batch and sequence dims dynamic (dynamic_axes=...), or export fixed shapes (dynamic=False). "
                f"Details: {str(x).splitlines()[0] if str(x) else type(x).__name__}")
    if any("Unsupported" in type(x).__name__ or "graph break" in str(x).lower() for x in chain):
        return ExportError("the model does not capture in one graph (a graph break; export needs fullgraph "
                           "capture). Export the language model alone (nsa_compile.export.LanguageModelForExport) "
                           f"with inputs_embeds, keeping the vision encoder in PyTorch. Details: {str(e)[:500]}")
    return e


def _plan(gm: fx.GraphModule, example_values: list, model: nn.Module, names: list[str], values: list
          ) -> tuple[list[tuple], dict]:
    """How `ExportModule` feeds each placeholder of ``gm`` (in order; the rewrite's extra inputs come last)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_values):
        raise ExportError(f"internal: {len(placeholders)} graph inputs but {len(example_values)} example values")
    params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {id(b): n for n, b in model.named_buffers(remove_duplicate=False)}
    user = {id(v): i for i, v in enumerate(values) if isinstance(v, torch.Tensor)}
    # symbolic sizes of the user inputs, from the fake values dynamo recorded
    sym_dims: dict[str, tuple[str, int, int]] = {}
    for node, ex in zip(placeholders, example_values):
        if isinstance(ex, torch.Tensor) and id(ex) in user:
            fake = node.meta.get("example_value")
            if isinstance(fake, torch.Tensor):
                for d, s in enumerate(fake.shape):
                    if isinstance(s, torch.SymInt):
                        sym_dims.setdefault(str(s.node.expr), ("size", user[id(ex)], d))
                for d, s in enumerate(fake.stride()):
                    if isinstance(s, torch.SymInt):
                        sym_dims.setdefault(str(s.node.expr), ("stride", user[id(ex)], d))
    plan, constants = [], {}
    mask_index = len(values)
    for node, ex in zip(placeholders, example_values):
        if node.name == VIDEO_MASK_INPUT:
            plan.append(("input", mask_index, None))
        elif isinstance(ex, torch.SymInt):
            key = str(ex.node.expr)
            if key not in sym_dims:
                raise ExportError(f"internal: graph input {node.name} is a size ({key}) not found among the inputs' "
                                  "shapes")
            plan.append(sym_dims[key])
        elif isinstance(ex, torch.Tensor):
            if id(ex) in user:
                plan.append(("input", user[id(ex)], None))
            elif id(ex) in params:
                plan.append(("parameter", params[id(ex)], None))
            elif id(ex) in buffers:
                plan.append(("buffer", buffers[id(ex)], None))
            else:
                name = f"_constant_{len(constants)}"
                constants[name] = ex.detach().clone()
                plan.append(("constant", name, None))
        else:
            plan.append(("value", ex, None))
    return plan, constants
