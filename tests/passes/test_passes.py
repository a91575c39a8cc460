"""The graph passes on graphs captured by dynamo from toy modules: which attention is found, which video mask."""

import pytest
import torch
import torch.nn.functional as F

from nsa_compile.passes.attention import find_attention_sites, skip_reason
from nsa_compile.passes.video_mask import find_video_mask
from tests.toy import VIDEO_ID, ToyVLM, toy_inputs


def capture(fn, *args):
    graphs = []

    def rec(gm, ex):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=rec, fullgraph=True)(*args)
    return graphs[0]


def test_sdpa_and_eager_forms_are_found_with_unrepeated_kv():
    ids, pix = toy_inputs()
    for form in ("sdpa", "eager"):
        gm = capture(ToyVLM(form=form), ids, pix)
        sites = find_attention_sites(gm)
        assert [s.form for s in sites] == [form, form]
        for s in sites:
            assert s.k.meta["example_value"].shape[1] == 2  # repeat_kv traced back to the 2 KV heads
            assert s.q.meta["example_value"].shape[1] == 6
            assert s.hidden is not None and s.hidden.meta["example_value"].shape[-1] == 48
            assert s.module.endswith(("layers.0", "layers.1"))
            assert skip_reason(s, True) is None
            assert "video tokens cannot be identified" in skip_reason(s, False)


def test_non_causal_attention_is_skipped():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 8, 4)
    (site,) = find_attention_sites(capture(f, q, q, q))
    assert "non-causal" in skip_reason(site, True)


def test_video_mask_follows_the_merge_to_the_token_id():
    ids, pix = toy_inputs()
    gm = capture(ToyVLM(), ids, pix)
    source, _ = find_video_mask(gm, ("video",), set(), set())
    assert source.kind == "merge" and source.token_ids == (VIDEO_ID,)
    # features from video inputs stay video even when their placeholder id is an image id (GLM-4.1V does that)
    source, _ = find_video_mask(gm, ("video",), {99}, {VIDEO_ID})
    assert source.kind == "merge"


def test_image_merge_is_not_video_unless_asked():
    def f(input_ids, pixel_values, w):
        x = F.embedding(input_ids, w)
        mask = (input_ids == 5).unsqueeze(-1).expand_as(x)
        return x.masked_scatter(mask, pixel_values)

    args = (torch.tensor([[1, 5, 5, 2]]), torch.randn(2, 3), torch.randn(8, 3))
    gm = capture(f, *args)
    source, notes = find_video_mask(gm, ("video",), {6}, {5})
    assert source.kind == "input_ids" and source.token_ids == (6,) and "image" in notes[0]
    source, _ = find_video_mask(gm, ("video", "image"), {6}, {5})
    assert source.kind == "merge" and source.token_ids == (5,)


def test_input_ids_fallback_needs_a_token_id():
    def f(input_ids, w):
        return F.embedding(input_ids, w)

    gm = capture(f, torch.randint(0, 5, (1, 6)), torch.randn(5, 3))
    assert find_video_mask(gm, ("video",), set(), set())[0] is None
    assert find_video_mask(gm, ("video",), {3}, set())[0].kind == "input_ids"


def test_aten_forms_are_found():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    q = torch.randn(1, 4, 8, 16)
    for kw in ({"pre_dispatch": True}, {}):  # aten.scaled_dot_product_attention, then the CPU flash form
        gm = make_fx(f, **kw)(q, q, q)
        (site,) = find_attention_sites(gm)
        assert site.is_causal and site.q.op == "placeholder" and site.k.op == "placeholder"
        assert site.node.meta["val"].shape == (1, 4, 8, 16)  # the attention output, not the returned tuple


# ------------------------------------------------------------------ attn_mask analysis (analyse_mask)
def _masked_sdpa(mask_fn):
    """SDPA of q [1, 2, Tq, 4] over k/v [1, 2, Tk, 4] with a mask built the way transformers builds it: positions
    ``arange(n) + offset`` indexed into [1, 1, Tq, 1] / [1, 1, 1, Tk] and compared, ANDed with key padding."""

    def f(q, k, v, pad):
        Tq, Tk = q.shape[2], k.shape[2]
        q_idx = (torch.arange(Tq) + (Tk - Tq))[None, None, :, None]
        kv_idx = (torch.arange(Tk) + 0)[None, None, None, :]
        mask = mask_fn(q_idx, kv_idx, pad).expand(1, -1, Tq, Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return f


MASKS = {
    "causal": (lambda q, kv, pad: kv <= q, "causal"),
    "causal, ge spelling": (lambda q, kv, pad: q >= kv, "causal"),
    "causal, lt spelling": (lambda q, kv, pad: kv < q + 1, "causal"),
    "causal + padding": (lambda q, kv, pad: (kv <= q) & pad[torch.arange(1)[:, None, None, None], kv], "causal+keys"),
    "causal, additive (eager attention)": (lambda q, kv, pad: torch.where(kv <= q, 0.0, -3.0e38), "causal"),
    "additive made bool": (lambda q, kv, pad: torch.where(kv > q, 0.0, -1e9).bool(), "opaque"),
    "off by one": (lambda q, kv, pad: kv <= q + 1, "opaque"),
    "sliding window": (lambda q, kv, pad: (kv <= q) & (kv > q - 3), "opaque"),
    "bidirectional padding": (lambda q, kv, pad: pad[torch.arange(1)[:, None, None, None], kv], "opaque"),
}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("Tq,Tk", [(8, 8), (1, 9), (3, 9)])
@pytest.mark.parametrize("name", list(MASKS))
def test_mask_analysis_reads_how_the_mask_is_built(name, Tq, Tk, dynamic):
    fn, expected = MASKS[name]
    q, k = torch.randn(1, 2, Tq, 4), torch.randn(1, 2, Tk, 4)
    pad = torch.rand(1, Tk) > 0.3
    graphs = []

    def rec(gm, ex):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_masked_sdpa(fn), backend=rec, fullgraph=True, dynamic=dynamic)(q, k, k, pad)
    (site,) = find_attention_sites(graphs[0])
    if Tq == 1 and name == "sliding window":
        expected = "causal+keys"  # one query: the window term varies over keys alone
    assert site.mask.kind == expected, site.mask


def test_mask_analysis_keeps_the_model_output():
    """The rewritten tiny Qwen2.5-VL text model gives the same output whether its padded causal mask is reduced to
    its per-key terms (the pass) or passed whole (analysis off)."""
    from unittest import mock

    import nsa_compile
    from nsa_compile import bench
    from nsa_compile.passes import attention

    model = bench.build_text_model(bench.TINY_TEXT, "cpu", torch.float32)
    emb, video = bench.make_inputs(200, 128, "cpu", torch.float32)
    pad = torch.ones(1, 200, dtype=torch.long)
    pad[:, :5] = 0
    cfg = nsa_compile.NSAConfig.preset("videonsa", block_size=16, block_stride=16, selection_block_size=16, top_n=2,
                                       window_size=32)
    outs, kinds = [], []
    for off in (False, True):
        torch._dynamo.reset()
        with mock.patch.object(attention, "analyse_mask", (lambda s: attention.MaskPlan(
                "opaque", why="off") if s.attn_mask is not None else attention.MaskPlan("")) if off
                else attention.analyse_mask):
            fn = nsa_compile.compile(model, cfg)
            with nsa_compile.video_mask(video), torch.no_grad():
                outs.append(fn(inputs_embeds=emb, attention_mask=pad).last_hidden_state[:, 5:])
        kinds.append({s.mask for s in fn.nsa_report.sites})
    assert kinds[0] == {"causal+keys"} and kinds[1] == {"opaque: off"}
    err = (outs[0] - outs[1]).norm() / outs[1].norm()
    assert torch.isfinite(outs[0]).all() and err <= 1e-5, err
