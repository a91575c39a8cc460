"""ONNX export: the decomposed NSA op against the reference in onnxruntime (dynamic batch and length from one file),
a single attention layer, the tiny Qwen2.5-VL language model's logits, the plugin file, and bad input."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nsa_compile
from nsa_compile import NSAConfig
from nsa_compile.export import ExportError, LanguageModelForExport, language_model_inputs, to_onnx
from nsa_compile.export.onnx_ops import (PLUGIN_DOMAIN, PLUGIN_NAMESPACE, PLUGIN_OP, nsa_attention_decomposed,
                                         translate_decomposed)
from nsa_compile.kernels import nsa_reference
from nsa_compile.models import build_video_inputs, tiny_qwen2_5_vl
from tests.export.helpers import LAYER_CFG, QWEN_CFG, rel, video_mask
from tests.toy import ToyAttention

TOL = 1e-4


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------- the op alone
class OpModule(nn.Module):
    """Calls the NSA op directly (queries = the last Tq of Tk keys; mask over the last Tm positions)."""

    def __init__(self, cfg, mask_kind=None):
        super().__init__()
        self.cfg, self.mask_kind = cfg, mask_kind

    def forward(self, q, k, v, gates, video_mask, pad):
        attn_mask = None
        if self.mask_kind == "bool":  # key padding: True = attend
            attn_mask = pad[:, None, None, :]
        elif self.mask_kind == "float":
            attn_mask = torch.zeros(pad.shape, dtype=q.dtype).masked_fill(~pad, float("-inf"))[:, None, None, :]
        c = self.cfg
        return torch.ops.nsa_compile.nsa_attention(q, k, v, gates, video_mask, attn_mask, 0.3, c.block_size,
                                                   c.block_stride, c.selection_block_size, c.top_n, c.window_size)


def op_inputs(B, Tq, Tk, Tm, seed, H=6, Hkv=2, D=8, Dv=12):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, H, Tq, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g), \
        torch.randn(B, Hkv, Tk, Dv, generator=g)
    gates = torch.rand(B, H, Tq, 3, generator=g)
    pad = torch.ones(B, Tk, dtype=torch.bool)
    pad[0, : Tk // 5] = False  # left padding in row 0
    return q, k, v, gates, video_mask(B, Tm, seed), pad


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_decomposed_op_matches_reference_at_several_shapes_from_one_file(tmp_path, mask_kind):
    module = OpModule(LAYER_CFG, mask_kind)
    example = op_inputs(2, 40, 40, 40, 0)
    b, tq, tk, tm = (torch.export.Dim(n) for n in ("b", "tq", "tk", "tm"))
    shapes = ({0: b, 2: tq}, {0: b, 2: tk}, {0: b, 2: tk}, {0: b, 2: tq}, {0: b, 1: tm}, {0: b, 1: tk})
    program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=shapes, optimize=False, verbose=False,
                                custom_translation_table={torch.ops.nsa_compile.nsa_attention.default:
                                                          translate_decomposed})
    program.save(str(tmp_path / "op.onnx"))
    model = onnx.load(tmp_path / "op.onnx")
    assert {n.domain for n in model.graph.node} == {""} and not model.functions  # standard operators only
    s = session(tmp_path / "op.onnx")
    names = [i.name for i in s.get_inputs()]
    # prefill at two lengths and batch sizes, then end-aligned queries over a longer KV (Tq < Tm < Tk)
    for B, Tq, Tk, Tm, seed in ((2, 40, 40, 40, 1), (3, 77, 77, 77, 2), (2, 9, 70, 30, 3)):
        inputs = op_inputs(B, Tq, Tk, Tm, seed)
        with torch.no_grad():
            ref = module(*inputs)
        out = s.run(None, dict(zip(names, (x.numpy() for x in inputs))))[0]
        assert rel(out, ref) <= TOL, (B, Tq, Tk, Tm)


def test_decomposed_ties_go_to_the_earlier_block():
    # equal keys: every compressed block gets the same probability, so all candidate blocks tie exactly
    B, H, Hkv, T, D = 1, 2, 1, 32, 4
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.ones(B, Hkv, T, D)
    v = torch.randn(B, Hkv, T, D, generator=g)
    gates = torch.tensor([0.0, 1.0, 0.0]).expand(B, H, T, 3).contiguous()  # the selection branch alone
    mask = torch.ones(B, T, dtype=torch.bool)
    args = dict(scale=0.5, block_size=4, block_stride=4, selection_block_size=4, top_n=2, window_size=3)
    ref = nsa_reference(q, k, v, gates, mask, None, **args)
    out = nsa_attention_decomposed(q.numpy(), k.numpy(), v.numpy(), gates.numpy(), mask.numpy(),
                                   np.zeros((), np.float32), **args)
    assert rel(np.asarray(out), ref) <= TOL
    # and it is the earliest blocks: the last query reads blocks 0 and 1 plus its own block (keys 28..31)
    chosen = torch.cat([torch.arange(0, 8), torch.arange(28, 32)])
    expected = v[0, 0, chosen].mean(0)  # all scores equal: uniform attention over the kept keys
    assert torch.allclose(torch.as_tensor(np.asarray(out))[0, :, -1], expected.expand(H, D), atol=1e-5)


# ------------------------------------------------------------------------------------------- one attention layer
def test_single_attention_layer_decomposed_two_lengths_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    layer = ToyAttention(hidden=48, heads=6, kv_heads=2).eval()
    x, m = torch.randn(2, 40, 48), video_mask(2, 40, 0)
    with pytest.warns(UserWarning, match="initial values"):
        res = to_onnx(layer, (x,), tmp_path / "layer.onnx", config=LAYER_CFG, video_mask=m)
    assert res.input_names == ["x", "nsa_video_mask"]
    assert res.dynamic_axes == {"x": {0: "batch", 1: "sequence"}, "nsa_video_mask": {0: "batch", 1: "sequence"}}
    model = onnx.load(tmp_path / "layer.onnx")
    assert {n.domain for n in model.graph.node} == {""} and not model.functions
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", "sequence", 48], ["batch", "sequence"]]
    initialisers = {i.name for i in model.graph.initializer}
    assert {f"model.nsa_gate.proj_{j}.{w}" for j in (1, 2) for w in ("weight", "bias")} <= initialisers
    s = session(tmp_path / "layer.onnx")
    for B, T in ((1, 40), (3, 93)):
        x, m = torch.randn(B, T, 48), video_mask(B, T, T)
        ref = res.run_torch(x, m)
        # the PyTorch side is the NSA reference itself (module-level check of the rewrite)
        with torch.no_grad():
            q = layer.q_proj(x).view(B, T, 6, 8).transpose(1, 2)
            k = layer.k_proj(x).view(B, T, 2, 8).transpose(1, 2)
            v = layer.v_proj(x).view(B, T, 2, 8).transpose(1, 2)
            o = nsa_reference(q, k, v, layer.nsa_gate(x), m, None, None, LAYER_CFG.block_size,
                              LAYER_CFG.block_stride, LAYER_CFG.selection_block_size, LAYER_CFG.top_n,
                              LAYER_CFG.window_size)
            expected = layer.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        assert rel(ref, expected) <= 1e-6
        out = s.run(None, {"x": x.numpy(), "nsa_video_mask": m.numpy()})[0]
        assert rel(out, ref) <= TOL, T


def test_trained_gates_are_exported(tmp_path):
    torch.manual_seed(0)
    layer = ToyAttention(hidden=48, heads=6, kv_heads=2).eval()
    x, m = torch.randn(2, 24, 48), video_mask(2, 24, 1)
    with pytest.warns(UserWarning, match="initial values"):
        to_onnx(layer, (x,), tmp_path / "a.onnx", config=LAYER_CFG, video_mask=m)
    with torch.no_grad():
        layer.nsa_gate.proj_2.weight.normal_()  # "training"
    res = to_onnx(layer, (x,), tmp_path / "b.onnx", config=LAYER_CFG, video_mask=m)  # gates reused: no warning
    init = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "b.onnx").graph.initializer}
    assert np.array_equal(init["model.nsa_gate.proj_2.weight"], layer.nsa_gate.proj_2.weight.detach().numpy())
    out = session(tmp_path / "b.onnx").run(None, {"x": x.numpy(), "nsa_video_mask": m.numpy()})[0]
    assert rel(out, res.run_torch(x, m)) <= TOL
    with pytest.raises(ExportError, match="already has an nsa_gate"):
        to_onnx(layer, (x,), tmp_path / "c.onnx", config=NSAConfig(**{**LAYER_CFG.to_dict(), "gate": "linear"}),
                video_mask=m)


# ------------------------------------------------------------------------------------------- Qwen language model
def qwen_example(model, proc, frames, seed):
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (frames, 112, 168, 3), generator=g, dtype=torch.uint8)
    return build_video_inputs(proc, video, "What happens in this video?")


def test_qwen_language_model_logits_match_pytorch_at_two_lengths(tmp_path):
    model, proc = tiny_qwen2_5_vl(num_layers=2)
    lm = LanguageModelForExport(model)
    inputs_a, inputs_b = qwen_example(model, proc, 4, 0), qwen_example(model, proc, 8, 1)
    (embeds, pos), mask = language_model_inputs(model, inputs_a)
    with pytest.warns(UserWarning, match="initial values"):
        res = to_onnx(lm, (embeds, pos), tmp_path / "lm.onnx", config=QWEN_CFG, video_mask=mask)
    assert res.input_names == ["inputs_embeds", "position_ids", "nsa_video_mask"]
    assert res.output_names == ["logits"]
    assert res.report.rewritten_modules == [f"language_model.layers.{i}.self_attn" for i in range(2)]
    s = session(tmp_path / "lm.onnx")
    lengths, outs = [], []
    for inputs in (inputs_a, inputs_b):
        (embeds, pos), mask = language_model_inputs(model, inputs)
        out = s.run(None, {"inputs_embeds": embeds.numpy(), "position_ids": pos.numpy(),
                           "nsa_video_mask": mask.numpy()})[0]
        assert rel(out, res.run_torch(embeds, pos, mask)) <= TOL
        lengths.append(embeds.shape[1])
        outs.append(out)
    # the PyTorch side is also what users run: the language model compiled with the nsa backend
    (embeds, pos), mask = language_model_inputs(model, inputs_a)
    with torch.no_grad(), nsa_compile.video_mask(mask):
        logits = nsa_compile.compile(lm, QWEN_CFG)(embeds, pos)
    assert rel(outs[0], logits) <= TOL
    assert lengths[0] != lengths[1] and min(lengths) > QWEN_CFG.window_size


def test_qwen_language_model_with_padding_mask(tmp_path):
    model, _ = tiny_qwen2_5_vl(num_layers=2)
    lm = LanguageModelForExport(model, attention_mask=True)

    def example(B, T, pad, seed):
        g = torch.Generator().manual_seed(seed)
        embeds = torch.randn(B, T, 448, generator=g)
        pos = (torch.arange(T) - pad).clamp(min=0).expand(3, B, T).contiguous()
        attention = torch.ones(B, T, dtype=torch.long)
        attention[0, :pad] = 0  # row 0 left-padded
        mask = video_mask(B, T, seed) & attention.bool()
        return (embeds, pos, attention), mask

    args, mask = example(2, 60, 7, 0)
    with pytest.warns(UserWarning, match="initial values"):
        res = to_onnx(lm, args, tmp_path / "lm_pad.onnx", config=QWEN_CFG, video_mask=mask)
    assert res.input_names == ["inputs_embeds", "position_ids", "attention_mask", "nsa_video_mask"]
    nsa = [n for n in res.captured.module.graph_module.graph.nodes
           if n.target is torch.ops.nsa_compile.nsa_attention.default]
    assert len(nsa) == 2 and all(n.args[5] is not None for n in nsa)  # the padding reaches the NSA op
    s = session(tmp_path / "lm_pad.onnx")
    for B, T, pad in ((2, 60, 9), (3, 85, 20)):
        args, mask = example(B, T, pad, T)
        out = s.run(None, dict(zip(res.input_names, (x.numpy() for x in (*args, mask)))))[0]
        ref = res.run_torch(*args, mask)
        assert rel(out[1:], ref[1:]) <= TOL and rel(out[0, pad:], ref[0, pad:]) <= TOL


# ------------------------------------------------------------------------------------------- plugin mode
def test_plugin_file_checks_and_carries_the_node(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ToyAttention(48, 6, 2), ToyAttention(48, 6, 2)).eval()
    x, m = torch.randn(2, 32, 48), video_mask(2, 32, 2)
    with pytest.warns(UserWarning, match="initial values"):
        to_onnx(model, (x,), tmp_path / "p.onnx", "plugin", config=LAYER_CFG, video_mask=m)
    proto = onnx.load(tmp_path / "p.onnx")
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    assert ("nsa_compile", 1) in {(o.domain, o.version) for o in proto.opset_import}
    nodes = [n for n in proto.graph.node if n.domain == PLUGIN_DOMAIN]
    assert len(nodes) == 2 and all(n.op_type == PLUGIN_OP for n in nodes)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"scale": pytest.approx(1 / math.sqrt(8)), "block_size": 8, "block_stride": 4,
                         "selection_block_size": 8, "top_n": 2, "window_size": 12,
                         "plugin_namespace": PLUGIN_NAMESPACE.encode(), "plugin_version": b"1"}
        assert len(node.input) == 5  # q, k, v, gates, video mask (no attn_mask)
        assert shapes[node.output[0]] == ["batch", 6, "sequence", 8]
    with pytest.raises(Exception, match="nsa_attention"):
        session(tmp_path / "p.onnx")  # onnxruntime has no such op: the file is for engines with our plugin


# ------------------------------------------------------------------------------------------- opsets
def test_opset_23_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    layer = ToyAttention(48, 6, 2).eval()
    x, m = torch.randn(2, 30, 48), video_mask(2, 30, 3)
    with pytest.warns(UserWarning):
        res = to_onnx(layer, (x,), tmp_path / "o23.onnx", config=LAYER_CFG, video_mask=m, opset=23)
    assert {(o.domain, o.version) for o in onnx.load(tmp_path / "o23.onnx").opset_import} >= {("", 23)}
    out = session(tmp_path / "o23.onnx").run(None, {"x": x.numpy(), "nsa_video_mask": m.numpy()})[0]
    assert rel(out, res.run_torch(x, m)) <= TOL


# ------------------------------------------------------------------------------------------- bad input
class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = ToyAttention(48, 6, 2)

    def forward(self, x):
        y = self.attn(x)
        if float(y.sum()) > 0:  # data-dependent Python branch: a graph break
            y = y + 1
        return y


@pytest.mark.parametrize("opset", [17, 24, "18"])
def test_unsupported_opset(tmp_path, opset):
    with pytest.raises(ExportError, match="opset .* not supported.*18"):
        to_onnx(NoAttention(), (torch.randn(2, 4, 8),), tmp_path / "x.onnx", opset=opset)


def test_unknown_mode(tmp_path):
    with pytest.raises(ExportError, match="'decomposed'.*'plugin'"):
        to_onnx(NoAttention(), (torch.randn(2, 4, 8),), tmp_path / "x.onnx", mode="fused")


def test_model_that_is_not_rewritten(tmp_path):
    with pytest.raises(ExportError, match="not rewritten into NSA"):
        to_onnx(NoAttention(), (torch.randn(2, 4, 8),), tmp_path / "x.onnx", config=LAYER_CFG)
    layer = ToyAttention(48, 6, 2).eval()  # attention, but nothing says which tokens are video
    with pytest.raises(ExportError, match="video tokens cannot be identified.*video_mask"):
        with pytest.warns(UserWarning):
            to_onnx(layer, (torch.randn(2, 16, 48),), tmp_path / "x.onnx", config=LAYER_CFG)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_axis_that_cannot_be_dynamic(tmp_path):
    layer = ToyAttention(48, 6, 2).eval()
    x, m = torch.randn(2, 16, 48), video_mask(2, 16, 0)
    with pytest.raises(ExportError, match="cannot be dynamic.*batch and sequence"):
        to_onnx(layer, (x,), tmp_path / "x.onnx", config=LAYER_CFG, video_mask=m,
                dynamic_axes={"x": {0: "batch", 1: "sequence", 2: "hidden"}})


def test_inconsistent_axes_and_mask(tmp_path):
    layer = ToyAttention(48, 6, 2).eval()
    with pytest.raises(ExportError, match="does not match the sequence axis"):
        to_onnx(layer, (torch.randn(2, 16, 48),), tmp_path / "x.onnx", config=LAYER_CFG,
                video_mask=video_mask(2, 15, 0))
    with pytest.raises(ExportError, match="one axis name must mean one size"):
        to_onnx(layer, (torch.randn(2, 16, 48),), tmp_path / "x.onnx", config=LAYER_CFG,
                video_mask=video_mask(2, 16, 0), dynamic_axes={"x": {0: "n", 1: "n"}})


def test_graph_break_names_the_way_out(tmp_path):
    x, m = torch.randn(2, 16, 48), video_mask(2, 16, 0)
    with pytest.raises(ExportError, match="one graph.*LanguageModelForExport"):
        to_onnx(Breaks().eval(), (x,), tmp_path / "x.onnx", config=LAYER_CFG, video_mask=m)


def test_kv_cache_inputs_are_refused(tmp_path):
    with pytest.raises(ExportError, match="prefill without a KV cache"):
        to_onnx(NoAttention(), {"x": torch.randn(2, 4, 8), "past_key_values": torch.zeros(1)}, tmp_path / "x.onnx")


def test_plain_sdpa_layer_function_is_found_in_any_wrapper(tmp_path):
    """A layer written with F.scaled_dot_product_attention inside a container module exports too."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = ToyAttention(48, 6, 2)
            self.norm = nn.LayerNorm(48)

        def forward(self, x):
            return x + self.self_attn(F.gelu(self.norm(x)))

    torch.manual_seed(0)
    block = Block().train()
    x, m = torch.randn(2, 20, 48), video_mask(2, 20, 5)
    cfg = NSAConfig(**{**LAYER_CFG.to_dict(), "gate": "constant", "gate_init": (0.2, 0.5, 0.3)})
    res = to_onnx(block, (x,), tmp_path / "block.onnx", config=cfg, video_mask=m)
    assert block.training and block.self_attn.training  # exported in eval mode, the caller's mode kept
    assert not hasattr(block.self_attn, "nsa_gate")  # constant gates attach nothing
    x2, m2 = torch.randn(3, 35, 48), video_mask(3, 35, 6)
    out = session(tmp_path / "block.onnx").run(None, {"x": x2.numpy(), "nsa_video_mask": m2.numpy()})[0]
    assert rel(out, res.run_torch(x2, m2)) <= TOL
