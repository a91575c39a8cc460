"""`to_tensorrt`: a serialized TensorRT engine of a model with NSA attention, by one of two routes.

* ``plugin`` – torch-tensorrt's dynamo path: the captured, rewritten module is exported with ``torch.export``, our
  op is registered as a TensorRT Quick Deployable Plugin (QDP, ``tensorrt.plugin``; TensorRT ≥ 10.7) under
  ``nsa_compile::nsa_attention`` together with a torch-tensorrt converter, and
  ``torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine`` builds the engine. The plugin's
  implementation is a JIT one: at engine run time it calls ``torch.ops.nsa_compile.nsa_attention`` (whatever kernel
  backs the op: the reference today, the Triton kernels of issue 3 later) on TensorRT's stream, so the engine runs
  inside a Python process that imported ``nsa_compile``.
* ``onnx`` – the ``decomposed`` ONNX file (`to_onnx`) parsed by TensorRT's ONNX parser: standard operators only, no
  plugin, the engine runs without Python.

torch-tensorrt and TensorRT are imported lazily; everything that does not need them (version pairing and route
choice, the plugin's shape descriptor and implementation, the converter and its capability check, optimisation
profiles) is plain Python and tested without them. The torch-tensorrt auto-generated plugin
(``torch_tensorrt.dynamo.conversion.plugins.custom_op``) cannot take our op: its schema has an optional tensor
(``attn_mask``), which that generator rejects and its generated converter would misalign; hence our own descriptor
and converter.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import tempfile
from dataclasses import dataclass, field

import torch

from ..config import NSAConfig
from .capture import Captured, ExportError, capture, write_atomically

PLUGIN_NAMESPACE = "nsa_compile"
PLUGIN_NAME = "nsa_attention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
ROUTES = ("auto", "plugin", "onnx")
#: Input tensors of the plugin, then its attributes (the op's schema minus the optional attn_mask).
PLUGIN_TENSORS = ("q", "k", "v", "gates", "video_mask")
PLUGIN_ATTRIBUTES = (("scale", float), ("block_size", int), ("block_stride", int), ("selection_block_size", int),
                     ("top_n", int), ("window_size", int))
#: Dtypes the plugin takes for q, k, v (the op computes half precision in float32).
PLUGIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QDP_MIN_TENSORRT = (10, 7)


@dataclass(frozen=True)
class Pairing:
    """One torch-tensorrt release: the torch minor it is built for (exactly that one), TensorRT, CUDA, and whether
    its plugin support for custom ops (Quick Deployable Plugins) is on."""

    torch_tensorrt: str
    torch: str
    tensorrt: str
    cuda: str
    qdp_plugins: bool


#: From the torch-tensorrt release notes (x86-64 Linux / Windows wheels) and our checks; see docs/export.md.
PAIRINGS = (
    Pairing("2.11", "2.11", "10.15", "12.6–13.0", False),
    Pairing("2.12", "2.12", "10.16", "13.0", True),
    Pairing("2.13", "2.13", "11.0", "13.0 / 13.2", True),
    Pairing("2.14", "2.14", "11.1", "13.2", True),
)


def _minor(version: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def pairing_for(torch_version: str) -> Pairing | None:
    """The torch-tensorrt release built for ``torch_version`` (by minor), if we know it."""
    mm = _minor(torch_version)
    for p in PAIRINGS:
        if _minor(p.torch) == mm:
            return p
    return None


def pairing_table() -> str:
    """`PAIRINGS` as a Markdown table."""
    rows = ["| torch-tensorrt | torch | TensorRT | CUDA | plugins for custom ops (QDP) |", "|---|---|---|---|---|"]
    rows += [f"| {p.torch_tensorrt} | {p.torch} | {p.tensorrt} | {p.cuda} | {'on' if p.qdp_plugins else 'off'} |"
             for p in PAIRINGS]
    return "\n".join(rows)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Environment:
    """What is installed: versions (None when absent), CUDA, and torch-tensorrt's QDP feature flag (None: unknown)."""

    torch: str
    torch_tensorrt: str | None
    tensorrt: str | None
    cuda: bool
    qdp_feature: bool | None = None


def installed() -> Environment:
    """The installed torch / torch-tensorrt / TensorRT (metadata only; nothing heavy is imported)."""
    trt = None
    for name in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"):
        trt = trt or _dist_version(name)
    return Environment(torch.__version__, _dist_version("torch-tensorrt") or _dist_version("torch_tensorrt"), trt,
                       torch.cuda.is_available())


def _install_hint(torch_version: str) -> str:
    p = pairing_for(torch_version)
    mm = _minor(torch_version)
    want = f"{mm[0]}.{mm[1]}" if mm else "your torch minor"
    table = (f" (torch-tensorrt {p.torch_tensorrt} pairs with TensorRT {p.tensorrt}, CUDA {p.cuda})" if p else "")
    return f"pip install 'torch-tensorrt=={want}.*'{table}, on a machine with an NVIDIA GPU"


def choose_route(requested: str, env: Environment, has_attn_mask: bool = False) -> tuple[str, str]:
    """Pick how `to_tensorrt` builds the engine.

    Returns:
        (route, reason): ``"plugin"`` (torch-tensorrt + our QDP plugin) or ``"onnx"`` (decomposed ONNX through
        TensorRT's ONNX parser).
    Raises:
        ExportError: naming what is missing and the way out (install line, the other route, or ONNX export).
    """
    if requested not in ROUTES:
        raise ExportError(f"unknown TensorRT route {requested!r}; use one of {ROUTES}")
    if not env.cuda:
        raise ExportError("TensorRT builds engines on an NVIDIA GPU and none is visible (torch.cuda.is_available() is "
                          "False). Build on a CUDA machine, or deploy the decomposed ONNX file "
                          "(nsa_compile.export.to_onnx(..., mode='decomposed')) with onnxruntime")
    problems = []
    if env.torch_tensorrt is None:
        problems.append(f"torch-tensorrt is not installed: {_install_hint(env.torch)}")
    elif _minor(env.torch_tensorrt) != _minor(env.torch):
        problems.append(f"torch-tensorrt {env.torch_tensorrt} is built for torch {env.torch_tensorrt.split('+')[0]} "
                        f"but torch is {env.torch}; each torch-tensorrt pairs with exactly one torch minor: "
                        f"{_install_hint(env.torch)}")
    else:
        p = pairing_for(env.torch)
        qdp = env.qdp_feature if env.qdp_feature is not None else (p.qdp_plugins if p else True)
        if not qdp:
            problems.append(f"torch-tensorrt {env.torch_tensorrt} has its plugin support for custom ops (Quick "
                            "Deployable Plugins) off; it is on from torch-tensorrt 2.12 (with torch 2.12)")
        trt = _minor(env.tensorrt)
        if trt is not None and trt < QDP_MIN_TENSORRT:
            problems.append(f"TensorRT {env.tensorrt} has no Python plugins (tensorrt.plugin needs ≥ 10.7)")
    if has_attn_mask:
        problems.append("the model passes an attention mask (e.g. padding) to NSA attention; the plugin takes "
                        "q, k, v, gates and the video mask only")
    if requested == "plugin":
        if problems:
            raise ExportError("TensorRT plugin route unavailable: " + "; ".join(problems)
                              + ". Or use route='onnx' (decomposed ONNX through TensorRT's ONNX parser)")
        return "plugin", "torch-tensorrt with the nsa_compile::nsa_attention plugin"
    if requested == "auto" and not problems:
        return "plugin", "torch-tensorrt with the nsa_compile::nsa_attention plugin"
    if env.tensorrt is None:
        raise ExportError("TensorRT is not installed" + (": " + "; ".join(problems) if problems else "")
                          + f". {_install_hint(env.torch)} (it brings TensorRT), or export ONNX with "
                          "nsa_compile.export.to_onnx(..., mode='decomposed') and build the engine elsewhere (e.g. "
                          "trtexec --onnx=FILE --saveEngine=FILE)")
    why = "; ".join(problems) if problems else "asked for"
    return "onnx", f"decomposed ONNX through TensorRT's ONNX parser ({why})"


# ------------------------------------------------------------------------------------------- the QDP plugin
def plugin_output_dims(q_dims, v_dims) -> list:
    """Output dims of the plugin from q [B, H, Tq, D] and v [B, Hkv, Tk, Dv] (any dim objects): [B, H, Tq, Dv]."""
    q_dims, v_dims = list(q_dims), list(v_dims)
    if len(q_dims) != 4 or len(v_dims) != 4:
        raise ValueError(f"{PLUGIN_ID} takes 4-D q and v; got ranks {len(q_dims)} and {len(v_dims)}")
    return [q_dims[0], q_dims[1], q_dims[2], v_dims[3]]


def _as_torch(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.as_tensor(t, device="cuda")


def make_plugin_functions(trtp):
    """The descriptor (``trtp.register``) and JIT implementation (``trtp.impl``) of the plugin, annotated with the
    classes of ``trtp`` (``tensorrt.plugin`` or a stand-in with ``TensorDesc``, ``Tensor`` and ``ShapeExprs``)."""

    def nsa_attention_desc(q, k, v, gates, video_mask, scale, block_size, block_stride, selection_block_size,
                           top_n, window_size):
        out = q.like()
        dims = plugin_output_dims([q.shape_expr[i] for i in range(q.ndim)], [v.shape_expr[i] for i in range(v.ndim)])
        exprs = trtp.ShapeExprs(4)
        for i, d in enumerate(dims):
            exprs[i] = d
        out.shape_expr = exprs
        return out

    def nsa_attention_impl(q, k, v, gates, video_mask, scale, block_size, block_stride, selection_block_size,
                           top_n, window_size, outputs, stream):
        import contextlib
        tq, tk, tv, tg, tm = (_as_torch(t) for t in (q, k, v, gates, video_mask))
        ctx = (torch.cuda.stream(torch.cuda.ExternalStream(stream)) if tq.is_cuda else contextlib.nullcontext())
        with ctx:
            out = torch.ops.nsa_compile.nsa_attention(
                tq, tk, tv, tg, tm.bool(), None, float(scale), int(block_size), int(block_stride),
                int(selection_block_size), int(top_n), int(window_size))
            _as_torch(outputs[0]).copy_(out)

    attrs = {name: typ for name, typ in PLUGIN_ATTRIBUTES}
    nsa_attention_desc.__annotations__ = {**{t: trtp.TensorDesc for t in PLUGIN_TENSORS}, **attrs,
                                          "return": trtp.TensorDesc}
    from typing import Tuple
    nsa_attention_impl.__annotations__ = {**{t: trtp.Tensor for t in PLUGIN_TENSORS}, **attrs,
                                          "outputs": Tuple[trtp.Tensor], "stream": int}
    return nsa_attention_desc, nsa_attention_impl


_PLUGIN_REGISTERED: dict[int, bool] = {}


def register_tensorrt_plugin(trtp=None) -> None:
    """Register ``nsa_compile::nsa_attention`` with TensorRT's plugin registry (QDP), once per ``trtp`` module.

    Raises:
        ExportError: ``tensorrt.plugin`` cannot be imported (TensorRT < 10.7 or not installed).
    """
    if trtp is None:
        try:
            trtp = importlib.import_module("tensorrt.plugin")
        except ImportError as e:
            raise ExportError(f"tensorrt.plugin cannot be imported ({e}): the plugin route needs TensorRT ≥ 10.7; "
                              f"{_install_hint(torch.__version__)}") from e
    if _PLUGIN_REGISTERED.get(id(trtp)):
        return
    desc, impl = make_plugin_functions(trtp)
    trtp.register(PLUGIN_ID)(desc)
    trtp.impl(PLUGIN_ID)(impl)
    _PLUGIN_REGISTERED[id(trtp)] = True


# ------------------------------------------------------------------------------------------- the converter
_OP_ARGS = ("q", "k", "v", "gates", "video_mask", "attn_mask") + tuple(n for n, _ in PLUGIN_ATTRIBUTES)


def op_arguments(args, kwargs) -> dict:
    """The NSA op's arguments by name, from an FX node's (or converter's) ``args`` and ``kwargs``."""
    named = dict(zip(_OP_ARGS, args))
    named.update(kwargs or {})
    return named


def _node_dtype(arg):
    val = arg.meta.get("val", arg.meta.get("example_value")) if hasattr(arg, "meta") else arg
    return getattr(val, "dtype", None)


def nsa_capability(node, settings=None) -> bool:
    """torch-tensorrt capability validator: the plugin takes the node when it has no ``attn_mask`` and q is fp32,
    fp16 or bf16; otherwise the node stays in PyTorch (use the ONNX route for padded batches)."""
    named = op_arguments(node.args, node.kwargs)
    if named.get("attn_mask") is not None:
        return False
    return _node_dtype(named.get("q")) in PLUGIN_DTYPES


def make_converter(trtp, get_trt_tensor):
    """The torch-tensorrt converter of ``torch.ops.nsa_compile.nsa_attention.default``: one plugin layer with the
    op's config as plugin attributes."""

    def nsa_attention_converter(ctx, target, args, kwargs, name):
        named = op_arguments(args, kwargs)
        if named.get("attn_mask") is not None:
            raise ExportError(f"{PLUGIN_ID} plugin has no attn_mask input (the capability check keeps such nodes "
                              "in PyTorch)")
        tensors = [get_trt_tensor(ctx, named[t], f"{name}_{t}") for t in PLUGIN_TENSORS]
        attrs = {n: typ(named[n]) for n, typ in PLUGIN_ATTRIBUTES}
        plugin = getattr(getattr(trtp.op, PLUGIN_NAMESPACE), PLUGIN_NAME)(*tensors, **attrs)
        layer = ctx.net.add_plugin(plugin)
        if not layer:
            raise ExportError(f"TensorRT did not create the {PLUGIN_ID} plugin layer for {name}")
        layer.name = f"[{target}]-[{name}]"
        return layer.get_output(0)

    return nsa_attention_converter


_CONVERTER_REGISTERED: list[bool] = []


def register_converter() -> None:
    """Register the plugin and its converter with torch-tensorrt (lazy imports; once per process)."""
    if _CONVERTER_REGISTERED:
        return
    register_tensorrt_plugin()
    try:
        trtp = importlib.import_module("tensorrt.plugin")
        conversion = importlib.import_module("torch_tensorrt.dynamo.conversion")
        utils = importlib.import_module("torch_tensorrt.dynamo.conversion.converter_utils")
    except ImportError as e:
        raise ExportError(f"torch-tensorrt cannot be imported ({e}): {_install_hint(torch.__version__)}") from e
    conversion.dynamo_tensorrt_converter(torch.ops.nsa_compile.nsa_attention.default,
                                         capability_validator=nsa_capability, supports_dynamic_shapes=True)(
        make_converter(trtp, utils.get_trt_tensor))
    _CONVERTER_REGISTERED.append(True)


# ------------------------------------------------------------------------------------------- shapes and build
def profile_shapes(args, dynamic_shapes, axis_ranges: dict[str, tuple[int, int]] | None = None
                   ) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every input for a TensorRT optimisation profile.

    A dynamic dim takes its axis's range from ``axis_ranges`` (``{"batch": (1, 8), "sequence": (16, 8192)}``),
    else (1, example size); ``opt`` is the example size clamped into the range. Static dims are fixed.

    Raises:
        ExportError: a range with min > max or below 1.
    """
    ranges = dict(axis_ranges or {})
    for axis, (lo, hi) in ranges.items():
        if not 1 <= lo <= hi:
            raise ExportError(f"axis range {axis}: ({lo}, {hi}) needs 1 ≤ min ≤ max")
    out = []
    for a, spec in zip(args, dynamic_shapes):
        lo, opt, hi = list(a.shape), list(a.shape), list(a.shape)
        for dim, axis in (spec or {}).items():
            size = int(a.shape[dim])
            r_lo, r_hi = ranges.get(axis, (1, size))
            lo[dim], hi[dim], opt[dim] = r_lo, r_hi, min(max(size, r_lo), r_hi)
        out.append((tuple(lo), tuple(opt), tuple(hi)))
    return out


@dataclass
class TensorRTExport:
    """What `to_tensorrt` wrote: the serialized engine at ``path``, the route taken and why, the engine's input
    names and optimisation-profile shapes, and the ONNX file used (``onnx`` route)."""

    path: str
    route: str
    reason: str
    input_names: list[str]
    shapes: list[tuple]
    onnx_path: str | None = None
    captured: Captured | None = field(default=None, repr=False)


def _build_with_torch_tensorrt(cap: Captured, shapes) -> bytes:
    torch_tensorrt = importlib.import_module("torch_tensorrt")
    register_converter()
    cap.module.to("cuda")
    args = tuple(a.to("cuda") for a in cap.args)
    ep = torch.export.export(cap.module, args, dynamic_shapes=(cap.dynamic_shapes,) if any(cap.dynamic_shapes)
                             else None, strict=False)
    inputs = [torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=a.dtype)
              for (lo, opt, hi), a in zip(shapes, args)]
    return torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(ep, inputs=inputs)


def _build_from_onnx(onnx_path: str, input_names, shapes) -> bytes:
    trt = importlib.import_module("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in zip(input_names, shapes):
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError("TensorRT could not build the engine (see its log above)")
    return bytes(engine)


def to_tensorrt(model, example_inputs, path: str | os.PathLike, *, config: NSAConfig | None = None,
                video_mask: torch.Tensor | None = None, route: str = "auto",
                axis_ranges: dict[str, tuple[int, int]] | None = None, onnx_path: str | None = None,
                dynamic_axes: dict | None = None) -> TensorRTExport:
    """Build and save a serialized TensorRT engine of ``model`` with NSA attention.

    Args:
        model, example_inputs, config, video_mask, dynamic_axes: as in `to_onnx`. The model is moved to CUDA.
        path: the engine file to write.
        route: ``"auto"`` (torch-tensorrt plugin route when available, else ONNX), ``"plugin"`` or ``"onnx"``
            (see module docs; `choose_route`).
        axis_ranges: ``{axis name: (min, max)}`` of the engine's optimisation profile; default (1, example size).
        onnx_path: where the ``onnx`` route writes its decomposed ONNX file (default: a temporary file).
    Raises:
        ExportError: no GPU, missing or mismatched torch-tensorrt / TensorRT (naming the install line and the other
            routes), or any `to_onnx` error.
    """
    env = installed()
    choose_route(route, env)  # fail fast, before the capture
    if env.torch_tensorrt is not None and _minor(env.torch_tensorrt) == _minor(env.torch):
        try:
            features = importlib.import_module("torch_tensorrt._features")
            env.qdp_feature = bool(getattr(features.ENABLED_FEATURES, "qdp_plugin", True))
        except ImportError:
            pass
    cap = capture(model, example_inputs, config, video_mask=video_mask, dynamic_axes=dynamic_axes)
    has_mask = any(n.target is torch.ops.nsa_compile.nsa_attention.default and op_arguments(n.args, n.kwargs)
                   .get("attn_mask") is not None for n in cap.module.graph_module.graph.nodes)
    chosen, reason = choose_route(route, env, has_mask)
    shapes = profile_shapes(cap.args, cap.dynamic_shapes, axis_ranges)
    written_onnx = None
    if chosen == "plugin":
        engine = _build_with_torch_tensorrt(cap, shapes)
    else:
        from .onnx_export import export_captured
        written_onnx = onnx_path or os.path.join(tempfile.mkdtemp(prefix="nsa_trt_"), "model.onnx")
        export_captured(cap, written_onnx, "decomposed")
        engine = _build_from_onnx(written_onnx, cap.input_names, shapes)
    path = os.fspath(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(engine)

    write_atomically(path, write)  # a temporary name, renamed: never a half-written engine
    return TensorRTExport(path, chosen, reason, cap.input_names, shapes, written_onnx, cap)
