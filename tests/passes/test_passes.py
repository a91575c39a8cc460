"""The graph passes on graphs captured by dynamo from toy modules: which attention is found, which video mask."""

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
