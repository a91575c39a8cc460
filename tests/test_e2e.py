"""The end-to-end benchmark's code path on CPU with a toy configuration, and sparse decode through a compiled model
(HF DynamicCache, the rewrite, the kept state found layer by layer)."""

import json

import pytest
import torch

import nsa_compile
from nsa_compile import NSAConfig
from nsa_compile.bench import TINY_TEXT, build_text_model, make_inputs
from nsa_compile.kernels import decode as dec


@pytest.fixture(autouse=True)
def empty_store():
    dec.clear_decode_states()
    yield
    dec.clear_decode_states()


def test_bench_e2e_tiny_through_the_cli(tmp_path, capsys):
    from nsa_compile.cli import main
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "BENCH.md"
    rc = main(["bench", "--e2e", "--tiny", "--tokens", "160", "--warmup-tokens", "96", "128", "--repeat", "1",
               "--decode-steps", "2", "--json", str(out_json), "--out", str(out_md), "--profile-prefill"])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "| 160 (96) |" in printed and "tiny language model" in printed
    for name in ("dense", "nsa"):  # --profile-prefill: one profiled prefill per mode, its op table in the log
        assert f"{name} T=160: profiled prefill" in captured.err
    assert captured.err.count("Self CPU time total") == 2
    res = json.loads(out_json.read_text())
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "nsa"}
    for r in rows.values():
        assert "error" not in r and r["prefill_s"] > 0 and r["decode_ms"] > 0
    states = rows["nsa"]["decode_states"]  # one state per layer, found at every decode step, never rebuilt
    assert states["builds"] == TINY_TEXT["num_hidden_layers"]
    assert states["hits"] == 2 * TINY_TEXT["num_hidden_layers"]
    assert states["rebuilds"] == 0 and states["misses"] == 0
    assert rows["nsa"]["state_found"] and rows["nsa"]["sparse_op_wall_us"] > 0
    assert "nsa-compile bench --e2e" in out_md.read_text()


def test_bench_rejects_7b_without_gpu(capsys):
    from nsa_compile.bench import main
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["--tokens", "1024"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _run(fn, model, emb, mask, steps, seed=3):
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    outs = []
    with torch.no_grad(), nsa_compile.video_mask(mask):
        outs.append(fn(inputs_embeds=emb, past_key_values=cache, use_cache=True).last_hidden_state[:, -1])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        e = torch.randn(1, 1, emb.shape[-1], generator=g) * 0.02
        with torch.no_grad(), nsa_compile.video_mask(torch.zeros(1, 1, dtype=torch.bool)):
            outs.append(fn(inputs_embeds=e, past_key_values=cache, use_cache=True).last_hidden_state[:, -1])
    return torch.stack(outs)


def test_compiled_sparse_decode_dense_equivalent_is_the_dense_model():
    torch.manual_seed(0)
    model = build_text_model(TINY_TEXT, "cpu", torch.float32)
    emb, mask = make_inputs(200, TINY_TEXT["hidden_size"], "cpu", torch.float32)
    dense = _run(model, model, emb, mask, steps=3)
    cfg = NSAConfig(block_size=16, block_stride=16, selection_block_size=16, top_n=4, window_size=16,
                    decode="sparse").dense_equivalent()
    compiled = nsa_compile.compile(model, cfg)
    out = _run(compiled, model, emb, mask, steps=3)
    assert len(compiled.nsa_report.rewritten_modules) == TINY_TEXT["num_hidden_layers"]
    assert ((out - dense).norm() / dense.norm()).item() <= 1e-4
    layers = TINY_TEXT["num_hidden_layers"]
    assert dec.STATES.stats["builds"] == layers and dec.STATES.stats["hits"] == 3 * layers
    assert dec.STATES.stats["rebuilds"] == 0


def test_compiled_sparse_decode_differs_from_dense_decode_only_after_the_prefill():
    torch.manual_seed(1)
    model = build_text_model(TINY_TEXT, "cpu", torch.float32)
    emb, mask = make_inputs(200, TINY_TEXT["hidden_size"], "cpu", torch.float32)
    base = dict(block_size=16, block_stride=16, selection_block_size=16, top_n=2, window_size=16, gate="constant",
                gate_init=(0.3, 0.4, 0.3))
    sparse = _run(nsa_compile.compile(model, NSAConfig(**base, decode="sparse")), model, emb, mask, steps=2)
    torch._dynamo.reset()
    densed = _run(nsa_compile.compile(model, NSAConfig(**base)), model, emb, mask, steps=2)
    assert torch.allclose(sparse[0], densed[0], atol=1e-6)  # prefill: the same op semantics
    assert (sparse[1:] - densed[1:]).abs().max() > 1e-4  # decode: text queries go through the NSA branches


def test_probe_bisects_to_the_step_and_oom_is_caught(monkeypatch):
    from types import SimpleNamespace

    from nsa_compile import bench
    limit = 300_000
    tried = []

    def fake_run_length(mode, T, *args, **kwargs):
        tried.append(T)
        if T > limit:  # what _attempt reports for a real allocation failure
            return {"tokens": T, "error": bench._attempt(lambda: (_ for _ in ()).throw(
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))[1]}
        return {"tokens": T}

    monkeypatch.setattr(bench, "run_length", fake_run_length)
    res = bench.probe(SimpleNamespace(name="dense"), 8, torch.float32, start=131072, step=16384, maximum=1 << 20,
                      budget_s=60, lo=131072)
    assert res["fits_tokens"] == 294912 and res["first_oom_tokens"] == 311296 and res["resolved_to_step"]
    assert tried[0] == 262144 and 131072 not in tried  # starts above the length known to fit
    with pytest.raises(ValueError):
        bench._attempt(lambda: (_ for _ in ()).throw(ValueError("not a memory error")))


def test_probe_resumes_from_bounds_given_on_the_command_line(monkeypatch):
    """--probe-fits / --probe-oom (bounds of an earlier probe cut by its time budget) reach the bisection."""
    from nsa_compile import bench
    got = []
    monkeypatch.setattr(bench, "run_length", lambda mode, T, *a, **k: {"tokens": T})
    monkeypatch.setattr(bench, "probe", lambda mode, *a, lo=0, hi=None: got.append((mode.name, lo, hi)) or {
        "mode": mode.name, "fits_tokens": lo, "fits_video_tokens": lo, "first_oom_tokens": hi,
        "resolved_to_step": False, "seconds": 0.0})
    assert bench.main(["--tiny", "--probe-only", "--modes", "dense", "--probe-fits", "606208",
                       "--probe-oom", "655360"]) == 0
    assert got == [("dense", 606208, 655360)]
