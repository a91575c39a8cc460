"""The `nsa` backend end to end: tiny Qwen2.5-VL split by dynamo as usual, toy models in one fullgraph capture,
gates trained through the compiled graph, the backend found by name, and bad input."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nsa_compile
from nsa_compile import NSAConfig
from nsa_compile.backend import _SLOT
from nsa_compile.kernels import nsa_reference
from nsa_compile.models import build_video_inputs, tiny_qwen2_5_vl
from tests.toy import VIDEO_ID, ToyVLM, toy_inputs

SMALL = NSAConfig(block_size=16, block_stride=16, selection_block_size=16, top_n=3, window_size=32)


def rel(a, b):
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def qwen_inputs(proc, frames=4, h=224, w=336, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (frames, h, w, 3), generator=g, dtype=torch.uint8)
    return build_video_inputs(proc, video, "What happens in this video?")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen_one_site_per_layer_and_dense_equivalent_logits(attn):
    model, proc = tiny_qwen2_5_vl(num_layers=3, attn_implementation=attn)
    inputs = qwen_inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        compiled = nsa_compile.compile(model, SMALL.dense_equivalent())
        out = compiled(**inputs).logits
    report = compiled.nsa_report
    assert report.rewritten_modules == [f"language_model.layers.{i}.self_attn" for i in range(3)]
    assert len(report.graphs) > 3  # split by graph breaks, as dynamo does
    for s in report.sites:
        if s.status == "rewritten":
            assert "visual" not in s.module and s.q_heads == 14 and s.kv_heads == 2
    assert sum(s.status == "rewritten" for s in report.sites) == 3
    assert any(g.mask_source.startswith("runtime") for g in report.graphs)  # the mask crossed a graph break
    assert rel(out, ref) <= 1e-4
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert report.budget()["video_tokens"] == [n_video]


def test_qwen_nsa_differs_from_dense_and_gates_train_through_compile():
    model, proc = tiny_qwen2_5_vl(num_layers=2)
    inputs = qwen_inputs(proc, seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits
    model.train()
    compiled = nsa_compile.compile(model, SMALL)
    out = compiled(**inputs).logits
    assert rel(out, ref) > 1e-3  # sparse attention with 0.5 gates is not the dense model
    names = [n for n, _ in model.named_parameters() if ".nsa_gate." in n]
    assert len(names) == 2 * 4 and all(".self_attn.nsa_gate.proj_" in n for n in names)
    assert set(names) <= set(model.state_dict())
    params = dict(model.named_parameters())
    out.float().square().mean().backward()
    for n in names:
        if n.endswith("proj_2.weight"):
            assert params[n].grad is not None and params[n].grad.abs().sum() > 0
    opt = torch.optim.SGD([params[n] for n in names], lr=0.1)
    before = {n: params[n].detach().clone() for n in names}
    opt.step()
    assert any(not torch.equal(before[n], params[n]) for n in names if "proj_2" in n)


def test_qwen_generate_on_the_compiled_forward_matches_dense_in_dense_equivalent():
    model, proc = tiny_qwen2_5_vl(num_layers=2)
    inputs = qwen_inputs(proc, seed=2)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        model.forward = nsa_compile.compile(model.forward, SMALL.dense_equivalent())
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert rel(a, b) <= 1e-4
    # prefill and decode graphs were both rewritten
    assert sum(s.status == "rewritten" for s in model.forward.nsa_report.sites) >= 4


def toy_expected(model, ids, pix, gates):
    """The toy model run eagerly with each attention replaced by the reference NSA (constant gates)."""
    x = model.embed_tokens(ids)
    mask = ids == VIDEO_ID
    x = x.masked_scatter(mask[..., None].expand_as(x), model.visual(pix))
    for layer in model.layers:
        B, T, _ = x.shape
        q = layer.q_proj(x).view(B, T, layer.h, layer.d).transpose(1, 2)
        k = layer.k_proj(x).view(B, T, layer.kv, layer.d).transpose(1, 2)
        v = layer.v_proj(x).view(B, T, layer.kv, layer.d).transpose(1, 2)
        g = torch.tensor(gates).expand(B, layer.h, T, 3)
        o = nsa_reference(q, k, v, g, mask, None, None, SMALL.block_size, SMALL.block_stride,
                          SMALL.selection_block_size, SMALL.top_n, SMALL.window_size)
        x = x + layer.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    return model.lm_head(x)


@pytest.mark.parametrize("form", ["sdpa", "eager"])
def test_fullgraph_capture_wires_the_mask_inside_the_graph(form):
    torch.manual_seed(0)
    model = ToyVLM(form=form)
    ids, pix = toy_inputs()
    gates = (0.2, 0.5, 0.3)
    cfg = NSAConfig(**{**SMALL.to_dict(), "gate": "constant", "gate_init": gates})
    compiled = nsa_compile.compile(model, cfg, fullgraph=True)
    _SLOT.recorded = torch.ones(7, 3, dtype=torch.bool)  # a stale mask the graph must not read
    with torch.no_grad():
        out = compiled(ids, pix)
        expected = toy_expected(model, ids, pix, gates)
    (graph,) = compiled.nsa_report.graphs
    assert graph.mask_source.startswith("merge")  # wired inside the graph, not read at run time
    assert rel(out, expected) <= 1e-5


def test_training_graphs_keep_the_topn_for_the_backward(monkeypatch):
    """Under autograd the rewrite emits ``nsa_attention_with_state`` (its backward reuses the forward's top-n ids);
    under ``no_grad`` (as every export captures) the plain ``nsa_attention``."""
    from nsa_compile.backend import NSABackend

    seen = []
    inner = NSABackend._inner

    def spy(self, gm, example_inputs, rewritten=True):
        if rewritten:
            seen.append({n.target for n in gm.graph.nodes if n.op == "call_function"})
        return inner(self, gm, example_inputs, rewritten)

    monkeypatch.setattr(NSABackend, "_inner", spy)
    torch.manual_seed(0)
    model = ToyVLM()
    ids, pix = toy_inputs()
    compiled = nsa_compile.compile(model, SMALL, fullgraph=True)
    with_state, plain = (torch.ops.nsa_compile.nsa_attention_with_state.default,
                         torch.ops.nsa_compile.nsa_attention.default)
    out = compiled(ids, pix)
    assert with_state in seen[-1] and plain not in seen[-1]
    out.square().mean().backward()
    assert model.layers[0].q_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        again = compiled(ids, pix)
    assert plain in seen[-1] and with_state not in seen[-1]
    assert rel(again, out.detach()) <= 1e-6


def test_layers_and_backward_find_the_mask_tables_by_identity(monkeypatch):
    """The mask the graph computes reaches every layer's op, and its backward, as one tensor: per training step one
    content comparison (`MaskCache`, a host sync on a GPU) for the first layer's lookup, none for the other three
    (here on the Triton path, forced onto the CPU's interpreter). Under ``inference_mode`` the mask is an
    inference tensor, without a version counter: every layer compares."""
    from nsa_compile.kernels import common
    from nsa_compile.kernels import nsa as nsa_mod
    from nsa_compile.kernels.nsa_triton import _TABLES

    monkeypatch.setattr(nsa_mod, "_route", lambda q, k, v, m: (True, None))
    _TABLES.clear()  # no entry of an earlier test to compare with at step 0
    counts = {"lookups": 0, "compares": 0, "in": False}
    get, equal = common.MaskCache.get, torch.equal

    def counting_get(self, mask, key, build):
        counts["lookups"] += 1
        counts["in"] = True
        try:
            return get(self, mask, key, build)
        finally:
            counts["in"] = False

    def counting_equal(a, b):
        counts["compares"] += counts["in"]
        return equal(a, b)

    monkeypatch.setattr(common.MaskCache, "get", counting_get)
    monkeypatch.setattr(torch, "equal", counting_equal)
    torch.manual_seed(0)
    model = ToyVLM(layers=2, hidden=96)  # head dim 16: the smallest the kernels take
    ids, pix = toy_inputs(B=1, T=64, spans=((8, 56),))
    compiled = nsa_compile.compile(model, SMALL, fullgraph=True)
    for step in range(2):
        counts.update(lookups=0, compares=0)
        compiled(ids, pix).square().mean().backward()
        assert (counts["lookups"], counts["compares"]) == (4, 0 if step == 0 else 1), step  # step 0 builds
    counts.update(lookups=0, compares=0)
    with torch.inference_mode():
        compiled(ids, pix)
    assert (counts["lookups"], counts["compares"]) == (2, 2)


def test_backend_by_name_without_importing_us():
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, '.')\n"
        "from tests.toy import ToyVLM, toy_inputs\n"
        "assert 'nsa_compile' not in sys.modules\n"
        "m = ToyVLM(); ids, pix = toy_inputs()\n"
        "opts = {'preset': 'paper', 'block_size': 16, 'block_stride': 8, 'selection_block_size': 16}\n"
        "out = torch.compile(m, backend='nsa', options=opts)(ids, pix)\n"
        "import nsa_compile\n"
        "r = nsa_compile.last_report()\n"
        "assert r.config.top_n == 16 and len(r.rewritten_modules) == 2, r.format()\n"
        "assert torch.isfinite(out).all()\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_sequence_without_video_warns_and_stays_dense():
    torch.manual_seed(0)
    model = ToyVLM()
    ids, _ = toy_inputs(B=1, spans=((0, 0),))
    pix = torch.randn(0, 12)
    with torch.no_grad():
        ref = model(ids, pix)
        with pytest.warns(UserWarning, match="without video tokens"):
            out = nsa_compile.compile(model, SMALL)(ids, pix)
    assert rel(out, ref) <= 1e-5


class TextLM(torch.nn.Module):
    """A decoder without any notion of video: no merge, no video token id."""

    def __init__(self, with_video_id=False):
        super().__init__()
        model = ToyVLM()
        self.embed_tokens, self.layers, self.lm_head = model.embed_tokens, model.layers, model.lm_head
        if with_video_id:
            self.config = model.config

    def forward(self, inputs_embeds):
        x = inputs_embeds
        for layer in self.layers:
            x = x + layer(x)
        return self.lm_head(x)


def test_model_whose_video_tokens_cannot_be_found_stays_dense_with_a_reason():
    torch.manual_seed(0)
    model = TextLM()
    x = torch.randn(1, 40, 48)
    with torch.no_grad():
        ref = model(x)
        compiled = nsa_compile.compile(model, SMALL)
        with pytest.warns(UserWarning, match="video tokens cannot be identified"):
            out = compiled(x)
    assert torch.equal(out, ref)
    assert all(s.status == "skipped" and "video tokens cannot be identified" in s.reason
               for s in compiled.nsa_report.sites)


def test_missing_runtime_mask_raises_and_video_mask_context_supplies_it():
    torch.manual_seed(0)
    model = TextLM(with_video_id=True)
    x = torch.randn(1, 40, 48)
    compiled = nsa_compile.compile(model, SMALL.dense_equivalent())
    with torch.no_grad():
        with pytest.raises(nsa_compile.VideoMaskMissing, match="video_mask"):
            compiled(x)
        mask = torch.zeros(1, 40, dtype=torch.bool)
        mask[:, 5:35] = True
        with nsa_compile.video_mask(mask):
            out = compiled(x)
    assert rel(out, model(x)) <= 1e-5


def test_a_forward_without_mask_source_never_reuses_the_previous_mask():
    torch.manual_seed(0)
    model = ToyVLM()
    ids, pix = toy_inputs()
    compiled = nsa_compile.compile(model, SMALL)
    with torch.no_grad():
        compiled(ids, pix)  # records a mask of the same shape
        x = model.embed_tokens(ids)
        with pytest.raises(nsa_compile.VideoMaskMissing):
            compiled(inputs_embeds=x)
        with nsa_compile.video_mask(ids == VIDEO_ID):
            compiled(inputs_embeds=x)


def test_invalid_options_name_the_field():
    with pytest.raises(Exception, match="block_size must be an int ≥ 1"):
        torch.compile(ToyVLM(), backend="nsa", options={"block_size": 0})(*toy_inputs())


def test_inductor_inner_backend_matches_the_reference_and_trains():
    torch.manual_seed(0)
    model = ToyVLM()
    ids, pix = toy_inputs()
    gates = (0.3, 0.4, 0.3)
    cfg = NSAConfig(**{**SMALL.to_dict(), "gate": "constant", "gate_init": gates, "inner_backend": "inductor"})
    out = nsa_compile.compile(model, cfg)(ids, pix)
    with torch.no_grad():
        expected = toy_expected(model, ids, pix, gates)
    assert rel(out.detach(), expected) <= 1e-5
    out.square().mean().backward()
    assert model.layers[0].q_proj.weight.grad.abs().sum() > 0


def test_unsupported_head_dim_stays_dense_with_a_warning():
    torch.manual_seed(0)
    model = ToyVLM(hidden=600, heads=2, kv_heads=1)  # head dim 300 > 256
    ids, pix = toy_inputs(T=40, spans=((4, 30), (0, 40)))
    with torch.no_grad():
        ref = model(ids, pix)
        compiled = nsa_compile.compile(model, SMALL)
        with pytest.warns(UserWarning, match="head dim 300"):
            out = compiled(ids, pix)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert {s.status for s in compiled.nsa_report.sites} == {"skipped"}


def test_qwen_left_padded_batch_dense_equivalent():
    model, proc = tiny_qwen2_5_vl(num_layers=2)
    a = qwen_inputs(proc, frames=4, h=224, w=336, seed=3)
    b = qwen_inputs(proc, frames=2, h=168, w=224, seed=4)
    T = a["input_ids"].shape[1]
    pad = T - b["input_ids"].shape[1]
    pad_id = model.generation_config.pad_token_id
    batch = {
        "input_ids": torch.cat([a["input_ids"], F.pad(b["input_ids"], (pad, 0), value=pad_id)]),
        "attention_mask": torch.cat([a["attention_mask"], F.pad(b["attention_mask"], (pad, 0), value=0)]),
        "mm_token_type_ids": torch.cat([a["mm_token_type_ids"], F.pad(b["mm_token_type_ids"], (pad, 0))]),
        "pixel_values_videos": torch.cat([a["pixel_values_videos"], b["pixel_values_videos"]]),
        "video_grid_thw": torch.cat([a["video_grid_thw"], b["video_grid_thw"]]),
        "second_per_grid_ts": torch.cat([a["second_per_grid_ts"], b["second_per_grid_ts"]]),
    }
    with torch.no_grad():
        ref = model(**batch).logits
        compiled = nsa_compile.compile(model, SMALL.dense_equivalent())
        out = compiled(**batch).logits
    keep = batch["attention_mask"].bool()
    assert rel(out[keep], ref[keep]) <= 1e-4  # padded positions are not compared
    tokens = compiled.nsa_report.budget()["video_tokens"]
    assert tokens == [int(x) for x in (batch["input_ids"] == model.config.video_token_id).sum(-1)]
    assert tokens[0] != tokens[1]


def _with_vision_segment(model, a, b, as_image: bool):
    """Inputs of ``a`` (one video) with the vision segment of ``b`` inserted after a's, as a second video or as an
    image (Qwen2-VL lays an image out like a 2-frame video)."""
    c = model.config
    ids_a, ids_b = a["input_ids"][0], b["input_ids"][0]
    end_a = int((ids_a == c.vision_end_token_id).nonzero()[0])
    start_b, end_b = (int((ids_b == t).nonzero()[0]) for t in (c.vision_start_token_id, c.vision_end_token_id))
    segment = ids_b[start_b:end_b + 1].clone()
    if as_image:
        segment[segment == c.video_token_id] = c.image_token_id
    ids = torch.cat([ids_a[:end_a + 1], segment, ids_a[end_a + 1:]])[None]
    mm = torch.zeros_like(ids)
    mm[ids == c.image_token_id], mm[ids == c.video_token_id] = 1, 2
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm)
    if as_image:
        out.update(pixel_values_videos=a["pixel_values_videos"], video_grid_thw=a["video_grid_thw"],
                   second_per_grid_ts=a["second_per_grid_ts"], pixel_values=b["pixel_values_videos"],
                   image_grid_thw=b["video_grid_thw"])
    else:
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            out[key] = torch.cat([a[key], b[key]])
    return out


@pytest.mark.parametrize("second", ["video", "image-as-text", "image-as-video"])
def test_qwen_two_videos_or_a_video_and_an_image(second):
    model, proc = tiny_qwen2_5_vl(num_layers=2)
    g = torch.Generator().manual_seed(5)
    a = build_video_inputs(proc, torch.randint(0, 256, (4, 112, 168, 3), generator=g, dtype=torch.uint8), "Compare.")
    frames = torch.randint(0, 256, (2 if second == "video" else 1, 168, 112, 3), generator=g, dtype=torch.uint8)
    b = build_video_inputs(proc, frames.expand(2, -1, -1, -1).contiguous(), "x")
    inputs = _with_vision_segment(model, a, b, as_image=second != "video")
    modalities = ("video", "image") if second == "image-as-video" else ("video",)
    cfg = NSAConfig(**{**SMALL.to_dict(), "modalities": modalities}).dense_equivalent()
    with torch.no_grad():
        ref = model(**inputs).logits
        compiled = nsa_compile.compile(model, cfg)
        out = compiled(**inputs).logits
    assert rel(out, ref) <= 1e-4
    ids, c = inputs["input_ids"][0], model.config
    expected = (ids == c.video_token_id) | ((ids == c.image_token_id) if second == "image-as-video" else False)
    mask = compiled.nsa_report.last_video_mask[0]
    assert torch.equal(mask, expected)
    assert int((mask[1:] & ~mask[:-1]).sum() + mask[0]) == (1 if second == "image-as-text" else 2)  # spans
