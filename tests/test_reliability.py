"""Reliability: the op is never silently wrong, and neither are the files and the compile around it.

* ``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch) on several inputs;
* numerics: a branch with nothing to attend contributes zeros (and finite gradients), scores are fp32 for fp16
  inputs (dot products beyond fp16's range), NaN / inf in the inputs reach the outputs dense SDPA would spoil;
* determinism: the Triton path's forward and backward are bitwise reproducible run to run;
* compile: ``strict=True`` turns every dense fallback into an error naming it; changing the video length or the
  frame count recompiles the graphs we rewrite once (the first dynamic-shape recompile) and never again; two
  models compiled in one process never share gates;
* files: gates, trainer state and exports are written under a temporary name and renamed; truncated or foreign
  checkpoints give a clear error; weights are read from safetensors only; a checkpoint's own code runs only with
  ``--trust-remote-code``;
* long context (GPU): 256K tokens × 64 query heads × head dim 128 against the reference computed in query chunks.

Fuzzed equivalence of the Triton path against the reference is `tests/kernels/test_fuzz.py`.
"""

import json
import math
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import nsa_compile
from nsa_compile import NSAConfig
from nsa_compile import finetune as ft
from nsa_compile.backend import NSAStrictError
from nsa_compile.kernels import nsa_reference
from tests.kernels.test_nsa import make, rel, spans
from tests.toy import ToyVLM, toy_inputs

SMALL = NSAConfig(block_size=16, block_stride=16, selection_block_size=16, top_n=3, window_size=32)
STRICT = NSAConfig(**{**SMALL.to_dict(), "strict": True})
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_chain(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of type ``kind`` in ``exc``'s cause / context chain (dynamo wraps backend errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _triton():
    pytest.importorskip("triton")
    from nsa_compile.kernels import nsa_triton
    return nsa_triton


# ------------------------------------------------------------------------------------------------ opcheck
OPCHECK_CASES = {
    # name: (B, Hq, Hkv, Tq, Tk, D, dtype, video ranges, attn_mask kind)
    "gqa3-two-spans-kv-cache": (2, 6, 2, 24, 40, 8, torch.float32, [[(0, 40)], [(4, 18), (22, 37)]], None),
    "fp64-padding-mask": (2, 4, 2, 32, 32, 8, torch.float64, [[(4, 30)], [(10, 32)]], "bool"),
    "no-video": (1, 4, 4, 20, 20, 8, torch.float32, [[]], None),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_schema_fake_tensor_and_autograd_registration(case):
    B, Hq, Hkv, Tq, Tk, D, dtype, ranges, mask_kind = OPCHECK_CASES[case]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=dtype, seed=1)
    vm = spans(B, Tk, ranges)[:, Tk - Tq:]
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
        attn_mask[1, :, :, :6] = False  # left padding of row 1 …
        attn_mask[1, :, :6, :6] = torch.eye(6, dtype=torch.bool)  # … whose padded queries see themselves
    args = (q, k, v, gates, vm, attn_mask, 0.3, 8, 4, 8, 2, 8)
    torch.library.opcheck(torch.ops.nsa_compile.nsa_attention.default, args)


@pytest.mark.gpu
def test_opcheck_on_the_triton_path():
    q, k, v, gates = (x.cuda().half() for x in make(2, 6, 2, 64, 64, D=16, dtype=torch.float32, seed=2))
    vm = spans(2, 64, [[(0, 64)], [(8, 30), (34, 60)]]).cuda()
    torch.library.opcheck(torch.ops.nsa_compile.nsa_attention.default,
                          (q, k, v, gates, vm, None, 0.25, 16, 16, 16, 2, 16))


# ------------------------------------------------------------------------------------------------ numerics
DEVICES = [pytest.param("cpu", id="cpu-interpreter"), pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]


def _both_paths(device):
    """(name, forward(q, k, v, gates, vm, scale, l, d, l', n, w)) of the reference op and of the Triton path."""
    nt = _triton()

    def reference(q, k, v, gates, vm, *params):
        return nsa_reference(q, k, v, gates, vm, None, *params)

    return [("reference", reference), ("triton", nt.nsa_triton_forward)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_branch_with_nothing_to_attend_contributes_zeros_and_finite_gradients(device):
    # Compression only (gates 1, 0, 0): a video query before the end of its span's first complete block has no
    # compressed block to attend; row 1 starts with text (dense, finite).
    B, Hq, Hkv, T, D, l = 2, 2, 1, 32, 16, 8
    dtype = torch.float32
    q, k, v, _ = (x.to(device, dtype) for x in make(B, Hq, Hkv, T, T, D=D, dtype=torch.float32, seed=3))
    gates = torch.tensor([1.0, 0.0, 0.0], device=device, dtype=dtype).expand(B, Hq, T, 3).contiguous()
    vm = spans(B, T, [[(0, 20), (26, 32)], [(10, 32)]]).to(device)
    params = (D ** -0.5, l, l, l, 2, 8)
    empty = torch.zeros(B, T, dtype=torch.bool, device=device)
    empty[0, 0:l - 1] = True  # positions 0 … 6 see no complete block (later spans see the first span's)
    empty[1, 10:10 + l - 1] = True
    nt = _triton()
    for half in (False, True):
        for name, forward in _both_paths(device):
            x = [t.half() for t in (q, k, v, gates)] if half else (q, k, v, gates)
            out = forward(*x, vm, *params)
            assert torch.isfinite(out).all(), name
            assert out.transpose(1, 2)[empty].abs().max() == 0, name  # exactly zero, not NaN, not garbage
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    nsa_reference(*inputs, vm, None, *params).float().square().sum().backward()
    go = torch.randn(B, Hq, T, D, device=device, dtype=dtype)
    grads = nt.nsa_triton_backward(go, q, k, v, gates, vm, *params)
    for g in [x.grad for x in inputs] + list(grads):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("device", DEVICES)
def test_scores_and_softmax_statistics_are_fp32_for_fp16_inputs(device):
    # q·k reaches ~1e5, beyond fp16's 65504: computed in fp16 the scores would overflow to inf and give NaN.
    B, Hq, Hkv, T, D = 1, 4, 2, 40, 64
    g = torch.Generator().manual_seed(4)
    q = (torch.randn(B, Hq, T, D, generator=g).sign() * 40).half()
    k = q[:, ::2].clone()  # a query's own key: q·k = 40·40·64
    v, gates = torch.randn(B, Hkv, T, D, generator=g).half(), torch.rand(B, Hq, T, 3, generator=g).half()
    vm = spans(B, T, [[(5, 40)]])
    params = (1.0, 8, 8, 8, 2, 12)  # scale 1: the scores are the raw dot products
    assert (q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2)).abs().max() > 65504
    ref = nsa_reference(q.double(), k.double(), v.double(), gates.double(), vm, None, *params)
    for name, forward in _both_paths(device):
        dev = [x.to(device) for x in (q, k, v, gates, vm)]
        out = forward(*dev, *params)
        assert out.dtype == torch.float16, name
        assert rel(out.double().cpu(), ref) <= 1e-2, name


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_in_inputs_propagate_like_dense_attention(device):
    B, Hq, Hkv, T, D = 1, 4, 2, 40, 16
    q, k, v, gates = (x.to(device) for x in make(B, Hq, Hkv, T, T, D=D, dtype=torch.float32, seed=5))
    vm = spans(B, T, [[(8, 36)]]).to(device)
    params = (D ** -0.5, 8, 8, 8, 1, 6)

    def nan_rows(out):  # bool [Hq, T]: rows with a NaN
        return torch.isnan(out[0]).any(-1).cpu()

    def sdpa(q_, k_, v_):  # dense attention by its definition: fp64 on the CPU (CUDA's fused kernels spoil whole
        q_, k_, v_ = (x.cpu().double() for x in (q_, k_, v_))  # tiles when one score is +inf)
        return F.scaled_dot_product_attention(q_, k_.repeat_interleave(2, 1), v_.repeat_interleave(2, 1),
                                              is_causal=True)

    cases = []
    for what, index, value in (("q", (0, 1, 3, 0), float("nan")),  # a text query
                               ("q", (0, 1, 20, 0), float("nan")),  # a video query
                               ("q", (0, 2, 20, 0), float("inf")),
                               ("k", (0, 0, 25, 0), float("nan")),  # a video key: every later query of the group
                               ("k", (0, 1, 4, 0), float("inf"))):  # a text key
        x = {"q": q.clone(), "k": k.clone(), "v": v.clone(), "gates": gates}
        x[what][index] = value
        cases.append((f"{what}{list(index)}={value}", x))
    x = {"q": q, "k": k, "v": v, "gates": gates.clone()}
    x["gates"][0, 1, 20, 1] = float("nan")
    cases.append(("gate of a video query", x))
    for label, x in cases:
        dense = nan_rows(sdpa(x["q"], x["k"], x["v"]))
        if label.startswith("gate"):
            dense = torch.zeros_like(dense)
            dense[1, 20] = True  # dense attention has no gates: the row the NaN gate weighs
        for name, forward in _both_paths(device):
            got = nan_rows(forward(x["q"], x["k"], x["v"], x["gates"], vm, *params))
            assert dense.any() and torch.equal(got, dense), (name, label, got.nonzero().tolist())
    # NaN in a value: dense attention spoils the rows that read it (its 0·NaN makes every row of a kernel tile
    # NaN as well); NSA must spoil at least the rows that read it.
    x = v.clone()
    x[0, 0, 25, 0] = float("nan")
    for name, forward in _both_paths(device):
        got = nan_rows(forward(q, k, x, gates, vm, *params))
        assert got[:2, 25:].all(), name


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("device,shape", [
    pytest.param("cpu", (1, 4, 2, 32, 16, [[(3, 14), (17, 30)]]), id="cpu-interpreter"),
    pytest.param("cuda", (2, 28, 4, 4096, 128, [[(100, 4000)], [(0, 1500), (1600, 4096)]]), id="gpu-T4096",
                 marks=pytest.mark.gpu)])
def test_triton_forward_and_backward_are_bitwise_reproducible(device, shape):
    nt = _triton()
    B, Hq, Hkv, T, D, ranges = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, gates = (x.to(device, dtype) for x in make(B, Hq, Hkv, T, T, D=D, dtype=torch.float32, seed=6))
    vm = spans(B, T, ranges).to(device)
    cfg = (D ** -0.5, 8, 8, 8, 2, 12) if device == "cpu" else (D ** -0.5, 64, 64, 64, 8, 256)
    go = torch.randn(B, Hq, T, D, device=device, dtype=dtype)
    runs = [(nt.nsa_triton_forward(q, k, v, gates, vm, *cfg), nt.nsa_triton_backward(go, q, k, v, gates, vm, *cfg))
            for _ in range(3 if device == "cuda" else 2)]
    (out, grads), rest = runs[0], runs[1:]
    for out2, grads2 in rest:
        assert torch.equal(out, out2)
        for name, a, b in zip(("dq", "dk", "dv", "dgates"), grads, grads2):
            assert torch.equal(a, b), f"{name} differs between two runs of the backward"


# ------------------------------------------------------------------------------------------------ strict mode
def _strict_error(call) -> NSAStrictError:
    with pytest.raises(Exception) as info:
        call()
    err = _in_chain(info.value, NSAStrictError)
    assert err is not None, f"expected NSAStrictError, got {info.value!r}"
    return err


def test_strict_mode_runs_clean_when_nothing_falls_back():
    torch.manual_seed(0)
    model = ToyVLM()
    ids, pix = toy_inputs()
    compiled = nsa_compile.compile(model, STRICT)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):  # the second call runs the cached graphs
            assert torch.isfinite(compiled(ids, pix)).all()
    assert not [w for w in caught if "nsa-compile" in str(w.message)]
    assert len(compiled.nsa_report.rewritten_modules) == 2


def test_strict_mode_names_each_dense_fallback():
    from tests.test_backend import TextLM
    torch.manual_seed(0)
    # an attention site that stays dense: head dim 300
    model = ToyVLM(hidden=600, heads=2, kv_heads=1)
    ids, pix = toy_inputs(T=40, spans=((4, 30), (0, 40)))
    err = _strict_error(lambda: nsa_compile.compile(model, STRICT)(ids, pix))
    assert "stays dense: head dim 300" in str(err) and "strict" in str(err)
    # video tokens that cannot be identified (no merge, no video token id)
    torch._dynamo.reset()
    err = _strict_error(lambda: nsa_compile.compile(TextLM(), STRICT)(torch.randn(1, 40, 48)))
    assert "video tokens cannot be identified" in str(err)
    # a sequence without video tokens
    torch._dynamo.reset()
    ids, _ = toy_inputs(B=1, spans=((0, 0),))
    err = _strict_error(lambda: nsa_compile.compile(ToyVLM(), STRICT)(ids, torch.randn(0, 12)))
    assert "without video tokens" in str(err)
    # a call that ran none of our graphs (dynamo ran the frame eagerly: here forced; past the recompile limit in
    # real life): strict raises, the default warns
    for cfg in (STRICT, SMALL):
        torch._dynamo.reset()
        compiled = nsa_compile.compile(ToyVLM(), cfg)
        ids, pix = toy_inputs()
        with torch.no_grad():
            compiled(ids, pix)
            with torch.compiler.set_stance("force_eager"):
                if cfg.strict:
                    err = _strict_error(lambda: compiled(ids, pix))
                    assert "ran without any graph compiled by the nsa backend" in str(err)
                else:
                    with pytest.warns(UserWarning, match="ran without any graph compiled by the nsa backend"):
                        compiled(ids, pix)


def test_strict_is_a_config_field_that_round_trips():
    cfg = NSAConfig.from_dict({"preset": "paper", "strict": True})
    assert cfg.strict and NSAConfig.from_dict(cfg.to_dict()) == cfg and not NSAConfig().strict
    with pytest.raises(nsa_compile.NSAConfigError, match="strict must be True or False"):
        NSAConfig(strict="yes")


@pytest.mark.gpu
def test_strict_mode_on_cuda_refuses_the_reference_fallback():
    torch.manual_seed(0)
    model = ToyVLM().cuda()  # head dim 8: below what the Triton kernels take
    ids, pix = (x.cuda() for x in toy_inputs())
    err = _strict_error(lambda: nsa_compile.compile(model, STRICT)(ids, pix))
    assert "plain-PyTorch reference instead of the Triton kernels: head dim" in str(err)


def test_strict_mode_refuses_a_mask_that_would_send_a_kernel_call_to_the_reference(monkeypatch):
    """Masks are read at run time (the pass passes those it cannot prove causal whole): inside the backend's
    `strict_kernels` context a mask that is more than key padding raises, outside it warns and runs the reference.
    ``use_triton`` is forced true here, as on a CUDA device, so the route is taken on CPU."""
    from nsa_compile.kernels import nsa as nsa_op
    monkeypatch.setattr(nsa_op, "use_triton", lambda q, m, v=None: True)
    monkeypatch.setattr(nsa_op, "_warned_mask", False)
    q = torch.randn(1, 2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    hole = causal.clone()
    hole[4, 1] = False  # a per-query hole: not key padding
    with nsa_op.strict_kernels(True):
        route, key_valid = nsa_op._route(q, q, q, causal)  # key padding (here none): the kernels, strict or not
    assert route and key_valid.all()
    with nsa_op.strict_kernels(True), pytest.raises(NSAStrictError, match="would run the NSA reference"):
        nsa_op._route(q, q, q, hole)
    with pytest.warns(UserWarning, match="runs the NSA reference"):
        assert nsa_op._route(q, q, q, hole) == (False, None)


# ------------------------------------------------------------------------------------------------ recompiles
def _rewritten_graphs(report) -> int:
    return sum(any(s.status == "rewritten" for s in g.sites) for g in report.graphs)


def test_a_new_video_length_recompiles_once_then_never():
    torch.manual_seed(0)
    compiled = nsa_compile.compile(ToyVLM(), SMALL, fullgraph=True)
    layouts = [(96, ((8, 80), (20, 96))), (80, ((4, 60), (10, 70))), (112, ((8, 100), (0, 50))),
               (64, ((8, 40), (2, 64))), (72, ((0, 72), (30, 31)))]
    counts = []
    for T, video in layouts:
        ids, pix = toy_inputs(T=T, spans=video)
        with torch.no_grad():
            compiled(ids, pix)
        counts.append(len(compiled.nsa_report.graphs))
    assert counts == [1, 2, 2, 2, 2]  # static, then the first dynamic-shape recompile, then none


def test_qwen_new_frame_counts_recompile_the_rewritten_graphs_once():
    from nsa_compile.models import build_video_inputs, tiny_qwen2_5_vl
    model, proc = tiny_qwen2_5_vl(num_layers=1)
    g = torch.Generator().manual_seed(0)
    videos = [(2, 56, 84), (4, 56, 84), (6, 56, 84), (4, 84, 112)]  # frame counts, then another resolution
    inputs = [build_video_inputs(proc, torch.randint(0, 256, (f, h, w, 3), generator=g, dtype=torch.uint8), "Hi")
              for f, h, w in videos]
    assert len({x["input_ids"].shape[1] for x in inputs}) == len(inputs)
    compiled = nsa_compile.compile(model, SMALL)
    counts = []
    for x in inputs:
        with torch.no_grad():
            compiled(**x)
        counts.append(_rewritten_graphs(compiled.nsa_report))
    # The vision tower's frames recompile on new grids in transformers' own Python (as under any backend); the
    # language-model graphs we rewrite compile twice: static shapes, then dynamic.
    assert counts == [1, 2, 2, 2]


# ------------------------------------------------------------------------------------------------ two models
@pytest.mark.parametrize("how", ["backend-by-name", "nsa_compile.compile"])
def test_two_models_compiled_in_one_process_never_share_gates(how):
    opts = {**SMALL.to_dict(), "gate": "linear"}
    ids, pix = toy_inputs()
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # the same weights: only the gates can tell the two apart
        models.append(ToyVLM())
    if how == "backend-by-name":  # equal options: dynamo sees one backend for both
        compiled = [torch.compile(m, backend="nsa", options=opts) for m in models]
    else:
        compiled = [nsa_compile.compile(m, NSAConfig(**opts)) for m in models]
    a, b = models
    with torch.no_grad():
        out_a, out_b = (c(ids, pix) for c in compiled)
        assert torch.equal(out_a, out_b)
        assert all(hasattr(layer, "nsa_gate") for m in models for layer in m.layers)
        assert a.layers[0].nsa_gate is not b.layers[0].nsa_gate
        for layer in a.layers:
            layer.nsa_gate.proj_2.bias.add_(2.0)
        assert not torch.equal(compiled[0](ids, pix), out_a)
        assert torch.equal(compiled[1](ids, pix), out_b)  # b reads its own gates, not a's
    compiled[0](ids, pix).square().mean().backward()
    gates_a = [p for n, p in a.named_parameters() if ".nsa_gate." in n]
    gates_b = [p for n, p in b.named_parameters() if ".nsa_gate." in n]
    assert all(p.grad is not None for p in gates_a) and all(p.grad is None for p in gates_b)


# ------------------------------------------------------------------------------------------------ files
def _trained_gates(tmp_path):
    from tests.test_finetune import trained_toy
    return trained_toy(tmp_path)


def test_truncated_or_foreign_gate_checkpoints_give_a_clear_error(tmp_path):
    from safetensors.torch import save_file
    model = _trained_gates(tmp_path)
    gates = tmp_path / ft.GATES_FILE
    data = gates.read_bytes()
    gates.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ft.FinetuneError, match=r"unreadable gate checkpoint .*truncated"):
        ft.load_gates(model, tmp_path)
    gates.write_bytes(data)
    ft.load_gates(model, tmp_path)
    save_file({"weight": torch.zeros(3)}, str(gates))  # someone else's safetensors file
    with pytest.raises(ft.FinetuneError, match="come from different saves"):
        ft.load_gates(model, tmp_path)
    (tmp_path / ft.CONFIG_FILE).write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))  # a model config
    with pytest.raises(ft.FinetuneError, match="not an nsa-compile gate config"):
        ft.load_gates(model, tmp_path)
    (tmp_path / ft.CONFIG_FILE).write_text("[1, 2")
    with pytest.raises(ft.FinetuneError, match="unreadable gate checkpoint"):
        ft.load_gates(model, tmp_path)


def test_gates_load_under_another_runtime_setting(tmp_path):
    model = _trained_gates(tmp_path)
    from tests.test_finetune import CFG
    for field, value in (("strict", True), ("inner_backend", "inductor")):
        assert ft.load_gates(model, tmp_path, NSAConfig(**{**CFG.to_dict(), field: value})) == CFG


def test_trainer_state_is_safetensors_and_json_without_pickle(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95))
    sum(p.square().sum() for p in params).backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "extra": {"lora_A": torch.ones(2, 2)},
             "result": {"history": [{"step": 1, "loss": 0.5}], "nan": float("nan")}}
    ft.save_trainer_state(str(tmp_path), state)
    assert sorted(os.listdir(tmp_path)) == [ft.STATE_JSON, ft.STATE_TENSORS]
    back = ft.load_trainer_state(str(tmp_path))
    assert back["step"] == 7 and back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys stay ints
    for i in (0, 1):
        for key, t in opt.state_dict()["state"][i].items():
            assert torch.equal(back["optimizer"]["state"][i][key], t)
    assert torch.equal(back["extra"]["lora_A"], torch.ones(2, 2)) and math.isnan(back["result"]["nan"])
    opt2 = torch.optim.AdamW(params, lr=1.0)
    opt2.load_state_dict(back["optimizer"])  # the optimizer takes it back
    assert opt2.param_groups[0]["lr"] == 1e-2
    # truncated, foreign, mixed
    tensors = tmp_path / ft.STATE_TENSORS
    data = tensors.read_bytes()
    tensors.write_bytes(data[:40])
    with pytest.raises(ft.FinetuneError, match="unreadable trainer checkpoint .*truncated"):
        ft.load_trainer_state(str(tmp_path))
    tensors.write_bytes(data)
    other = tmp_path / "other"
    ft.save_trainer_state(str(other), {"step": 1})
    os.replace(other / ft.STATE_TENSORS, tensors)
    with pytest.raises(ft.FinetuneError, match="different saves"):
        ft.load_trainer_state(str(tmp_path))
    (tmp_path / ft.STATE_JSON).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ft.FinetuneError, match="not an nsa-compile trainer state"):
        ft.load_trainer_state(str(tmp_path))
    os.remove(tmp_path / ft.STATE_JSON)
    with pytest.raises(ft.FinetuneError, match="trainer_state.json is missing"):
        ft.load_trainer_state(str(tmp_path))
    with pytest.raises(ft.FinetuneError, match="cannot write object"):
        ft.save_trainer_state(str(tmp_path / "bad"), {"x": object()})


def test_no_pickle_loads_in_the_package():
    """Weights and states are read from safetensors / JSON only: no torch.load, pickle or numpy pickles."""
    pattern = re.compile(r"torch\.load\(|import pickle|pickle\.loads?\(|allow_pickle=True|weights_only=False")
    hits = []
    for folder, _, files in os.walk(os.path.join(ROOT, "nsa_compile")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path) as fh:
                    hits += [f"{path}:{i}" for i, line in enumerate(fh, 1) if pattern.search(line)]
    assert not hits, hits


def test_export_writes_to_a_temporary_name_and_renames(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from nsa_compile.export import to_onnx
    from nsa_compile.export.capture import write_atomically
    from tests.toy import ToyAttention

    # the helper: a failing write leaves the previous file whole and nothing else behind
    target = tmp_path / "out.bin"
    write_atomically(target, lambda tmp: open(tmp, "wb").write(b"first"))

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        with open(tmp + ".data", "wb") as f:
            f.write(b"side")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["out.bin"]
    write_atomically(target, lambda tmp: (open(tmp, "wb").write(b"second"), open(tmp + ".data", "wb").write(b"d")))
    assert target.read_bytes() == b"second" and sorted(os.listdir(tmp_path)) == ["out.bin", "out.bin.data"]

    # the ONNX export: a file that fails its check is never put in place
    torch.manual_seed(0)
    layer = ToyAttention(hidden=32, heads=4, kv_heads=2)
    x = torch.randn(1, 24, 32)
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[:, 4:20] = True
    path = tmp_path / "layer.onnx"
    path.write_bytes(b"previous export")
    import onnx

    def broken_check(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated")
    monkeypatch.setattr(onnx.checker, "check_model", broken_check)
    with pytest.raises(Exception, match="simulated"):
        to_onnx(layer, x, path, config=SMALL, video_mask=mask)
    assert path.read_bytes() == b"previous export"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    monkeypatch.undo()
    torch._dynamo.reset()
    to_onnx(layer, x, path, config=SMALL, video_mask=mask)
    onnx.checker.check_model(str(path), full_check=True)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


# ------------------------------------------------------------------------------------------------ remote code
def _checkpoint_with_code(folder) -> str:
    """A local checkpoint whose config names its own Python code (auto_map); importing it leaves a marker."""
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, "CODE_RAN")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "nsa_test_remote", "architectures": ["EvilModel"],
                   "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}},
                  f)
    with open(os.path.join(folder, "evil.py"), "w") as f:
        f.write(f"open({marker!r}, 'w').write('ran')\n"
                "from transformers import PretrainedConfig\n"
                "class EvilConfig(PretrainedConfig):\n    model_type = 'nsa_test_remote'\n")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, os.path.join(folder, "model.safetensors"))
    return marker


def test_a_checkpoint_s_own_code_never_runs_without_trust_remote_code(tmp_path, capsys):
    from nsa_compile.cli import build_parser, main
    from nsa_compile.models import ModelLoadError, load_pretrained
    marker = _checkpoint_with_code(tmp_path / "ckpt")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_pretrained(str(tmp_path / "ckpt"), torch.float32, "cpu")
    assert not os.path.exists(marker)
    assert main(["inspect", "--model", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("nsa-compile: error:")]
    assert len(line) == 1 and "--trust-remote-code" in line[0] and "Traceback" not in err
    assert not os.path.exists(marker)
    parser = build_parser()
    for argv in (["run"], ["inspect"], ["export", "--out", "x.onnx"], ["finetune"]):
        assert parser.parse_args(argv).trust_remote_code is False
        assert parser.parse_args(argv + ["--trust-remote-code"]).trust_remote_code is True


def test_weights_are_read_from_safetensors_only(tmp_path):
    from nsa_compile.models import ModelLoadError, load_pretrained, tiny_qwen2_5_vl
    model, _ = tiny_qwen2_5_vl(num_layers=1)
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the weights as a pickle only
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        load_pretrained(str(tmp_path), torch.float32, "cpu")


# ------------------------------------------------------------------------------------------------ long context
@pytest.mark.gpu
@pytest.mark.slow
def test_long_context_256k_tokens_64_heads_against_the_chunked_reference():
    """256K tokens × 64 query heads (8 KV heads) × head dim 128 in bf16: 2**31 elements in q, so offsets past 2**31
    are exercised. The reference runs on query chunks (causality: queries i0 … i1−1 need only keys < i1), at the
    start, the middle and the end; the backward (both: recomputing, and with the forward's state) is checked with a
    gradient that is zero outside one chunk."""
    from tests.kernels.test_nsa_triton import block_structured, check_chunk

    nt = _triton()
    T = int(os.environ.get("NSA_LONG_T", 262144))
    B, Hq, Hkv, D = 1, 64, 8, 128
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    # keys with a per-block component, as in video: block scores differ clearly, so few rows are near ties
    k = block_structured(torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g), seed=8)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    gates = torch.rand(B, Hq, T, 3, device="cuda", dtype=torch.bfloat16, generator=g)
    vm = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    vm[:, 200:T // 2 - 100] = True  # two videos with text around and between them
    vm[:, T // 2 + 50:T - 300] = True
    cfg = NSAConfig.preset("videonsa")
    params = (cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size)
    keep = {}
    ids = torch.full((B, Hkv, T, cfg.top_n), -1, dtype=torch.int32, device="cuda")
    lse = torch.zeros(B, Hq, T, 3, device="cuda")
    with torch.no_grad():
        out = nt.nsa_triton_forward(q, k, v, gates, vm, D ** -0.5, *params, _keep=keep, selected_out=ids,
                                    lse_out=lse)
        assert out.shape == q.shape and torch.isfinite(out).all()
        selected = keep.pop("selected")
        # the backward is checked on 64 queries, the end of the second video and the text after it (fp32 autograd
        # over 256K keys: ~25 GB); the forward at the start, the middle and the end
        C, i0, i1 = 512, T - 332, T - 268
        for c0 in (0, T // 2 - C // 2, T - C):  # selections equal up to near ties, outputs ≤ 1e-2
            check_chunk(out, selected, q, k, v, gates, vm, c0, c0 + C, D ** -0.5, params)
        same = check_chunk(out, selected, q, k, v, gates, vm, i0, i1, D ** -0.5, params)  # [B, Hkv, 64]
    del selected
    go = torch.zeros_like(q)
    go[:, :, i0:i1] = torch.randn(B, Hq, i1 - i0, D, device="cuda", dtype=torch.bfloat16, generator=g)
    inputs = [x.float().requires_grad_() for x in (q[:, :, i0:i1], k[:, :, :i1], v[:, :, :i1], gates[:, :, i0:i1])]
    nsa_reference(*inputs, vm[:, :i1], None, D ** -0.5, *params).backward(go[:, :, i0:i1].float())
    rows = same.repeat_interleave(Hq // Hkv, 1)  # dq and dgates are per row: compare the rows that agree
    # the backward that recomputes the top-n (selection by query tile) and the training op's, given the forward's
    # top-n, log-sum-exps and output (selection by key segment)
    for state in ({}, dict(selected=ids, lse=lse, out=out)):
        dq, dk, dv, dg = nt.nsa_triton_backward(go, q, k, v, gates, vm, D ** -0.5, *params, **state)
        for x in (dq[:, :, :i0], dq[:, :, i1:], dg[:, :, :i0], dg[:, :, i1:], dk[:, :, i1:], dv[:, :, i1:]):
            assert x.abs().max() == 0  # no gradient where dO is zero, nor to keys after the last query
        for name, a, b in (("dq", dq[:, :, i0:i1], inputs[0].grad), ("dgates", dg[:, :, i0:i1], inputs[3].grad)):
            assert rel(a.float()[rows], b[rows]) <= 2e-2, (name, bool(state))
        if bool(same.all()):  # dk and dv sum over the rows: comparable when every row selects the same blocks
            for name, a, b in (("dk", dk[:, :, :i1], inputs[1].grad), ("dv", dv[:, :, :i1], inputs[2].grad)):
                assert rel(a.float(), b) <= 2e-2, (name, bool(state))
        del dq, dk, dv, dg


# ------------------------------------------------------------------------------------------------ hardware limits
def test_fp32_above_head_dim_128_goes_to_the_reference():
    """`scripts/check_kernels_sm90.py` found the fp32 backward tiles (and the fp32 decode kernel) at head dim 256
    over an H100's shared memory: the op takes fp32 on the kernels only up to head dim 128."""
    from nsa_compile.kernels.decode import use_decode_triton
    from nsa_compile.kernels.nsa import max_head_dim, use_triton

    assert max_head_dim(torch.float32) == 128 and max_head_dim(torch.bfloat16) == max_head_dim(torch.float16) == 256
    if torch.cuda.is_available():
        for dtype, D, ok in ((torch.float32, 128, True), (torch.float32, 256, False), (torch.bfloat16, 256, True)):
            q = torch.zeros(1, 2, 4, D, device="cuda", dtype=dtype)
            assert use_triton(q, None, q) is ok and use_decode_triton(q, q, q, None) is ok, (dtype, D)
