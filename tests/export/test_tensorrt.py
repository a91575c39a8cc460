"""TensorRT route: everything that runs without TensorRT (version pairing and route choice, the plugin's shape
descriptor and implementation, its registration, the converter and its capability check, optimisation profiles);
engine builds need TensorRT and a GPU and skip here."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from nsa_compile.export import ExportError, capture, choose_route, pairing_table, to_tensorrt
from nsa_compile.export import tensorrt as trt_export
from nsa_compile.export.tensorrt import (PLUGIN_ID, Environment, make_converter, make_plugin_functions,
                                         nsa_capability, op_arguments, pairing_for, profile_shapes,
                                         register_tensorrt_plugin)
from nsa_compile.kernels import nsa_reference
from tests.export.helpers import LAYER_CFG, rel, video_mask
from tests.toy import ToyAttention

NO_TRT = "TensorRT's libraries cannot be installed on our machines (needs an NVIDIA GPU and TensorRT)"


def env(**kw):
    base = dict(torch="2.13.0+cu130", torch_tensorrt="2.13.0", tensorrt="11.0.0", cuda=True)
    return Environment(**{**base, **kw})


# ------------------------------------------------------------------------------------------- versions and routes
def test_pairing_table():
    assert pairing_for("2.13.0+cpu").tensorrt == "11.0"
    assert pairing_for("2.12.1").tensorrt == "10.16" and pairing_for("2.12.1").qdp_plugins
    assert not pairing_for("2.11.0").qdp_plugins
    assert pairing_for("2.9.0") is None
    table = pairing_table()
    assert "| 2.14 | 2.14 | 11.1 |" in table and "| 2.11 | 2.11 | 10.15 | 12.6–13.0 | off |" in table


def test_route_choice():
    assert choose_route("auto", env())[0] == "plugin"
    assert choose_route("onnx", env()) == ("onnx", "decomposed ONNX through TensorRT's ONNX parser (asked for)")
    # an attention mask in the graph: the plugin cannot take it, the ONNX route can
    route, why = choose_route("auto", env(), has_attn_mask=True)
    assert route == "onnx" and "attention mask" in why
    with pytest.raises(ExportError, match="plugin route unavailable.*attention mask.*route='onnx'"):
        choose_route("plugin", env(), has_attn_mask=True)
    # torch-tensorrt 2.11: its custom-op plugins are off
    route, why = choose_route("auto", env(torch="2.11.0", torch_tensorrt="2.11.0", tensorrt="10.15.1"))
    assert route == "onnx" and "on from torch-tensorrt 2.12" in why
    # a runtime feature flag overrides the table
    assert choose_route("auto", env(qdp_feature=False))[0] == "onnx"
    # torch-tensorrt built for another torch
    route, why = choose_route("auto", env(torch_tensorrt="2.12.1"))
    assert route == "onnx" and "pairs with exactly one torch minor" in why
    with pytest.raises(ExportError, match="unknown TensorRT route"):
        choose_route("fast", env())


def test_missing_torch_tensorrt_names_the_way_out():
    with pytest.raises(ExportError, match=r"torch-tensorrt is not installed: pip install 'torch-tensorrt==2\.13\.\*' "
                                          r"\(torch-tensorrt 2\.13 pairs with TensorRT 11\.0.*to_onnx"):
        choose_route("auto", env(torch_tensorrt=None, tensorrt=None))
    with pytest.raises(ExportError, match="plugin route unavailable: torch-tensorrt is not installed"):
        choose_route("plugin", env(torch_tensorrt=None))
    # TensorRT alone (no torch-tensorrt) still builds from the decomposed ONNX file
    assert choose_route("auto", env(torch_tensorrt=None))[0] == "onnx"
    with pytest.raises(ExportError, match="NVIDIA GPU.*mode='decomposed'"):
        choose_route("auto", env(cuda=False))


def test_to_tensorrt_here_fails_fast_with_the_way_out(tmp_path):
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is available here: the build tests below run instead")
    with pytest.raises(ExportError, match="GPU|not installed"):
        to_tensorrt(ToyAttention(48, 6, 2), (torch.randn(2, 16, 48),), tmp_path / "x.engine",
                    video_mask=video_mask(2, 16, 0))
    assert not (tmp_path / "x.engine").exists()


# ------------------------------------------------------------------------------------------- plugin descriptor
class ShapeExprs(list):
    def __init__(self, n):
        super().__init__([None] * n)


class TensorDesc:
    def __init__(self, shape, dtype=torch.float32):
        self.shape_expr, self.dtype = list(shape), dtype

    @property
    def ndim(self):
        return len(self.shape_expr)

    def like(self):
        return TensorDesc(self.shape_expr, self.dtype)


class FakeTRTP:
    """Stand-in for ``tensorrt.plugin``: records registrations; ``op.<ns>.<name>(...)`` records plugin calls."""

    ShapeExprs, TensorDesc = ShapeExprs, TensorDesc

    class Tensor:
        pass

    def __init__(self):
        self.registered, self.impls, self.calls = {}, {}, []
        fake = self

        class _Op:
            def __getattr__(self, ns):
                return SimpleNamespace(nsa_attention=lambda *t, **a: fake.calls.append((ns, t, a)) or "plugin")

        self.op = _Op()

    def register(self, plugin_id):
        return lambda f: self.registered.setdefault(plugin_id, f)

    def impl(self, plugin_id):
        return lambda f: self.impls.setdefault(plugin_id, f)


def test_plugin_descriptor_shapes_and_dtype():
    desc, _ = make_plugin_functions(FakeTRTP)
    q, k, v = TensorDesc(["B", 14, "T", 32], torch.bfloat16), TensorDesc(["B", 2, "S", 32]), \
        TensorDesc(["B", 2, "S", 48])
    out = desc(q, k, v, TensorDesc(["B", 14, "T", 3]), TensorDesc(["B", "M"], torch.bool), 0.2, 64, 64, 64, 32, 256)
    assert out.shape_expr == ["B", 14, "T", 48] and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="4-D"):
        desc(TensorDesc([1, 2, 3]), k, v, None, None, 0.2, 64, 64, 64, 32, 256)


def test_plugin_implementation_runs_the_op():
    _, impl = make_plugin_functions(FakeTRTP)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g), \
        torch.randn(2, 2, 40, 8, generator=g)
    gates, mask = torch.rand(2, 6, 40, 3, generator=g), video_mask(2, 40, 0)
    out = torch.empty(2, 6, 40, 8)
    impl(q, k, v, gates, mask.to(torch.uint8), 0.3, 8, 4, 8, 2, 12, (out,), 0)
    ref = nsa_reference(q, k, v, gates, mask, None, 0.3, 8, 4, 8, 2, 12)
    assert rel(out, ref) <= 1e-6


def test_plugin_registration_annotations_and_idempotence():
    fake = FakeTRTP()
    register_tensorrt_plugin(fake)
    register_tensorrt_plugin(fake)  # once per TensorRT module
    desc, impl = fake.registered[PLUGIN_ID], fake.impls[PLUGIN_ID]
    ann = desc.__annotations__
    assert [ann[n] for n in ("q", "k", "v", "gates", "video_mask")] == [TensorDesc] * 5
    assert (ann["scale"], ann["block_size"], ann["window_size"], ann["return"]) == (float, int, int, TensorDesc)
    assert impl.__annotations__["stream"] is int and "outputs" in impl.__annotations__
    assert list(ann)[:11] == ["q", "k", "v", "gates", "video_mask", "scale", "block_size", "block_stride",
                              "selection_block_size", "top_n", "window_size"]


def test_registration_without_tensorrt_is_a_clear_error():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed")
    with pytest.raises(ExportError, match="tensorrt.plugin cannot be imported.*TensorRT ≥ 10.7.*pip install"):
        register_tensorrt_plugin()


# ------------------------------------------------------------------------------------------- converter
@pytest.fixture
def nsa_nodes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ToyAttention(48, 6, 2), ToyAttention(48, 6, 2)).eval()
    with pytest.warns(UserWarning, match="initial values"):
        cap = capture(model, (torch.randn(2, 24, 48),), LAYER_CFG, video_mask=video_mask(2, 24, 0))
    return [n for n in cap.module.graph_module.graph.nodes
            if n.target is torch.ops.nsa_compile.nsa_attention.default]


def test_capability_selects_the_plugin_converter_for_captured_nodes(nsa_nodes):
    assert len(nsa_nodes) == 2
    assert all(nsa_capability(n) and nsa_capability(n, settings=None) for n in nsa_nodes)
    node = nsa_nodes[0]
    masked = SimpleNamespace(args=node.args[:5] + (node.args[4],) + node.args[6:], kwargs={})
    assert not nsa_capability(masked)  # an attn_mask stays in PyTorch (or take the ONNX route)
    as_double = SimpleNamespace(args=(SimpleNamespace(meta={"val": torch.zeros(1, dtype=torch.float64)}),)
                                + node.args[1:], kwargs={})
    assert not nsa_capability(as_double)


def test_converter_adds_one_plugin_layer_with_the_config(nsa_nodes):
    fake = FakeTRTP()
    layers = []

    class Layer:
        name = ""

        def get_output(self, i):
            return f"out{i}"

    ctx = SimpleNamespace(net=SimpleNamespace(add_plugin=lambda p: layers.append(p) or Layer()))
    converter = make_converter(fake, lambda ctx, t, name: f"itensor:{name}")
    node = nsa_nodes[0]
    out = converter(ctx, node.target, node.args, node.kwargs, "nsa0")
    assert out == "out0" and layers == ["plugin"]
    (ns, tensors, attrs), = fake.calls
    assert ns == "nsa_compile"
    assert tensors == tuple(f"itensor:nsa0_{t}" for t in ("q", "k", "v", "gates", "video_mask"))
    assert attrs == {"scale": pytest.approx(8 ** -0.5), "block_size": 8, "block_stride": 4,
                     "selection_block_size": 8, "top_n": 2, "window_size": 12}
    assert op_arguments(node.args, node.kwargs)["attn_mask"] is None
    with pytest.raises(ExportError, match="no attn_mask input"):
        converter(ctx, node.target, node.args[:5] + ("mask",) + node.args[6:], {}, "nsa1")


# ------------------------------------------------------------------------------------------- profiles
def test_profile_shapes():
    args = (torch.zeros(2, 40, 448), torch.zeros(3, 2, 40, dtype=torch.long), torch.zeros(2, 40, dtype=torch.bool))
    dyn = ({0: "batch", 1: "sequence"}, {1: "batch", 2: "sequence"}, {0: "batch", 1: "sequence"})
    shapes = profile_shapes(args, dyn, {"sequence": (16, 4096)})
    assert shapes[0] == ((1, 16, 448), (2, 40, 448), (2, 4096, 448))
    assert shapes[1] == ((3, 1, 16), (3, 2, 40), (3, 2, 4096))
    assert profile_shapes(args, ({}, {}, {}))[2] == ((2, 40), (2, 40), (2, 40))
    with pytest.raises(ExportError, match="min ≤ max"):
        profile_shapes(args, dyn, {"batch": (4, 2)})


# ------------------------------------------------------------------------------------------- real builds
def _needs_tensorrt():
    if not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None:
        pytest.skip(NO_TRT)


@pytest.mark.parametrize("route", ["onnx", "plugin"])
def test_engine_build(tmp_path, route):
    _needs_tensorrt()
    if route == "plugin" and importlib.util.find_spec("torch_tensorrt") is None:
        pytest.skip("torch-tensorrt is not installed")
    import tensorrt as trt
    torch.manual_seed(0)
    layer = ToyAttention(48, 6, 2).eval()
    res = to_tensorrt(layer, (torch.randn(2, 32, 48),), tmp_path / "layer.engine", config=LAYER_CFG,
                      video_mask=video_mask(2, 32, 0), route=route, axis_ranges={"batch": (1, 4),
                                                                                 "sequence": (8, 128)})
    assert res.route == route
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(open(res.path, "rb").read())
    assert engine is not None


def test_export_package_imports_without_onnx_or_tensorrt():
    import subprocess
    import sys
    code = ("import sys; import nsa_compile.export as e; "
            "assert not {'onnx', 'onnxscript', 'tensorrt', 'torch_tensorrt'} & set(sys.modules); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]
    assert trt_export.PLUGIN_ID == "nsa_compile::nsa_attention"
