"""Sparse decode (``NSAConfig.decode="sparse"``): the reference against a per-query loop of the README semantics, the
Triton decode kernels against the reference (CPU under the Triton interpreter; GPU tests marked ``gpu``), and the
op's kept compressed state (found by fingerprint, rebuilt when stale, never silently reused)."""

import math
import warnings

import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels import NSAInputError, nsa_attention, nsa_reference
from nsa_compile.kernels import decode as dec
from tests.kernels.test_nsa import dense_causal, make, naive_blocks, rel, spans

triton = pytest.importorskip("triton")
# The kernel and op tests run on the GPU where there is one (same tolerances), else under the Triton interpreter.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def empty_store():
    dec.clear_decode_states()
    dec._warned.clear()
    yield
    dec.clear_decode_states()


def naive_sparse(q, k, v, gates, video, cfg):
    """One query at a time, straight from the README: video queries, and (Tq < Tk) text queries with a video key
    before them, mix compression / selection / window; other queries attend densely. ``video``: bool [B, Tk]."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    l, d, ls, n, w = cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size
    scale = 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, Tq, v.shape[-1], dtype=q.dtype)

    def attend(qv, keys, kk, vv):
        if not keys:
            return torch.zeros(vv.shape[-1], dtype=q.dtype)
        return torch.softmax(kk[keys] @ qv * scale, 0) @ vv[keys]

    for b in range(B):
        vid = video[b].tolist()
        cblocks, sblocks = naive_blocks(vid, l, d, ls)
        for hk in range(Hkv):
            kk, vv = k[b, hk], v[b, hk]
            kc = torch.stack([kk[a:z + 1].mean(0) for a, z in cblocks]) if cblocks else None
            vc = torch.stack([vv[a:z + 1].mean(0) for a, z in cblocks]) if cblocks else None
            for i in range(Tq):
                p = Tk - Tq + i
                heads = range(hk * G, hk * G + G)
                sparse = vid[p] or (Tq < Tk and any(vid[:p]))
                if not sparse:
                    for h in heads:
                        out[b, h, i] = attend(q[b, h, i], list(range(p + 1)), kk, vv)
                    continue
                own_start = next(sb[0] for sb in sblocks if sb[0] <= p <= sb[1]) if vid[p] else p + 1
                vis = [c for c, (a, z) in enumerate(cblocks) if z <= p]
                cand = [s for s, (a, z) in enumerate(sblocks) if z < own_start]
                score = torch.zeros(len(sblocks), dtype=q.dtype)
                o_cmp = {}
                for h in heads:
                    o_cmp[h] = torch.zeros(v.shape[-1], dtype=q.dtype)
                    if vis:
                        pc = torch.softmax(kc[vis] @ q[b, h, i] * scale, 0)
                        o_cmp[h] = pc @ vc[vis]
                        for c, pr in zip(vis, pc):
                            for s, (a, z) in enumerate(sblocks):
                                if cblocks[c][0] <= z and cblocks[c][1] >= a:
                                    score[s] += pr
                chosen = sorted(cand, key=lambda s: (-score[s].item(), s))[:n]
                keys = [j for j in range(p + 1) if not vid[j] or j >= own_start
                        or any(sblocks[s][0] <= j <= sblocks[s][1] for s in chosen)]
                win = list(range(max(0, p - w + 1), p + 1))
                for h in heads:
                    g = gates[b, h, i]
                    out[b, h, i] = (g[0] * o_cmp[h] + g[1] * attend(q[b, h, i], keys, kk, vv)
                                    + g[2] * attend(q[b, h, i], win, kk, vv))
    return out


# name: (B, Hq, Hkv, Tq, Tk, D, video ranges per row over all Tk keys, (l, d, l', n, w))
CASES = {
    "B2-HQ6-H2-decode1-two-spans": (2, 6, 2, 1, 190, 16, [[(10, 150)], [(0, 60), (70, 170)]], (16, 8, 16, 3, 24)),
    "B1-HQ7-H1-decode3-group7": (1, 7, 1, 3, 160, 16, [[(5, 140)]], (16, 16, 16, 2, 20)),
    "B2-HQ4-H4-cont6-text-gaps": (2, 4, 4, 6, 150, 32, [[(3, 40), (44, 47), (52, 120)], [(20, 100)]],
                                  (8, 4, 8, 3, 10)),
    "B2-HQ16-H1-decode2-one-row-without-video": (2, 16, 1, 2, 130, 16, [[(0, 110)], []], (8, 8, 16, 2, 12)),
    "B1-HQ6-H2-cont20-video-in-call": (1, 6, 2, 20, 170, 16, [[(10, 90), (155, 168)]], (16, 8, 16, 2, 16)),
    "B1-HQ4-H2-decode1-topn-covers-all": (1, 4, 2, 1, 120, 16, [[(4, 100)]], (16, 16, 16, 50, 8)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_matches_per_query_loop(case):
    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES[case]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, seed=2)
    video = spans(B, Tk, ranges)
    cfg = NSAConfig(block_size=l, block_stride=d, selection_block_size=ls, top_n=n, window_size=w)
    out = nsa_reference(q, k, v, gates, video, None, None, l, d, ls, n, w, decode="sparse")
    assert rel(out, naive_sparse(q, k, v, gates, video, cfg)) <= 1e-10
    # text queries did go sparse where video precedes them (else the test would not test anything)
    dense_text = nsa_reference(q, k, v, gates, video, None, None, l, d, ls, n, w)
    if any(ranges[b] and not video[b, -1] for b in range(B)):
        assert rel(out, dense_text) > 1e-3


def test_prefill_is_unchanged_and_dense_equivalent_stays_dense():
    q, k, v, gates = make(2, 6, 2, 150, 150, seed=3)
    video = spans(2, 150, [[(10, 120)], [(0, 140)]])
    cfg = NSAConfig(block_size=16, block_stride=8, selection_block_size=16, top_n=2, window_size=12)
    a = nsa_reference(q, k, v, gates, video, None, None, 16, 8, 16, 2, 12, decode="sparse")
    b = nsa_reference(q, k, v, gates, video, None, None, 16, 8, 16, 2, 12)
    assert torch.equal(a, b)
    eq = cfg.dense_equivalent()
    g = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand(2, 6, 5, 3)
    out = nsa_reference(q[:, :, -5:], k, v, g, video, None, None, eq.block_size, eq.block_stride,
                        eq.selection_block_size, eq.top_n, eq.window_size, decode="sparse")
    assert rel(out, dense_causal(q[:, :, -5:], k, v)) <= 1e-10
    with pytest.raises(NSAInputError, match="decode"):
        nsa_reference(q, k, v, gates, video, decode="sparce")


# ------------------------------------------------------------------------------------------ kernels (interpreter)
def _inputs(case, dtype, seed):
    B, Hq, Hkv, Tq, Tk, D, ranges, blocks = CASES[case]
    q, k, v, gates = (x.to(DEV) for x in make(B, Hq, Hkv, Tq, Tk, D=D, dtype=dtype, seed=seed))
    return q, k, v, gates, spans(B, Tk, ranges).to(DEV), blocks


def _text_only_cases():
    """Cases whose queries are all text (the decode kernels' domain)."""
    out = []
    for name, (B, Hq, Hkv, Tq, Tk, D, ranges, _) in CASES.items():
        video = spans(B, Tk, ranges)
        if not video[:, Tk - Tq:].any():
            out.append(name)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", _text_only_cases())
def test_decode_kernels_interpreter_against_reference(case, dtype, tol, monkeypatch):
    monkeypatch.setattr(dec, "POISON_SCRATCH", True)
    q, k, v, gates, video, (l, d, ls, n, w) = _inputs(case, dtype, seed=4)
    Tk, Tq = k.shape[2], q.shape[2]
    anchor = Tk - Tq - 2  # two decoded (text) tokens after the state's anchor
    state = dec.build_decode_state(k[:, :, :anchor], v[:, :, :anchor], video[:, :anchor], l, d, ls)
    scale = 1 / math.sqrt(q.shape[-1])
    ref = nsa_reference(*(x.double() for x in (q, k, v, gates)), video, None, scale, l, d, ls, n, w,
                        decode="sparse")
    out = torch.full(q.shape[:3] + (v.shape[-1],), float("nan"), dtype=dtype, device=DEV)
    dec.sparse_decode_triton(q, k, v, gates, state, scale, n, w, out=out)
    assert rel(out.double(), ref) <= tol
    # the plain-PyTorch twin over the same state
    assert rel(dec.sparse_decode_reference(q.double(), k.double(), v.double(), gates.double(), state, scale, n, w),
               ref) <= 1e-12


@pytest.mark.parametrize("schedule", ["last", "separate"], ids=["fused", "separate-select"])
@pytest.mark.parametrize("splits", [(1, 1), (3, 2), (7, 5)], ids=["S1-S2-1-1", "3-2", "7-5"])
def test_decode_kernels_any_split_count(splits, schedule, monkeypatch):
    """Any split of the compression and attention kernels, with the selection in the compression kernel's last
    program per row (its ticket must be zero again after the launch) or in its own launch. (The spread selection
    waits for other programs, which the interpreter runs one after another: on CPU it is refused.)"""
    monkeypatch.setattr(dec, "POISON_SCRATCH", True)
    q, k, v, gates, video, (l, d, ls, n, w) = _inputs("B2-HQ6-H2-decode1-two-spans", torch.float32, seed=5)
    state = dec.build_decode_state(k, v, video, l, d, ls)
    scale = 1 / math.sqrt(q.shape[-1])
    ref = nsa_reference(q, k, v, gates, video, None, scale, l, d, ls, n, w, decode="sparse")
    for _ in range(2):  # the second launch reuses the tickets the first left
        out = dec.sparse_decode_triton(q, k, v, gates, state, scale, n, w, split_cmp=splits[0],
                                       split_attn=splits[1], schedule=schedule)
        assert rel(out, ref) <= 1e-5
        assert not dec._counters(q.device, 1).any()
    with pytest.raises(ValueError, match="one program per SM"):
        dec.sparse_decode_triton(q, k, v, gates, state, scale, n, w, schedule="spread")
    with pytest.raises(ValueError, match="'auto', 'spread'"):
        dec.sparse_decode_triton(q, k, v, gates, state, scale, n, w, schedule="fused")


def test_states_of_one_prefill_share_their_mask_tables():
    """The layers of a prefill share one mask: their states share its tables (built once); a mask changed in place
    (the same tensor, other values) gets tables of its own, equal to ones built without the cache."""
    _, k, v, _, video, (l, d, ls, _, _) = _inputs("B2-HQ6-H2-decode1-two-spans", torch.float32, seed=5)
    first = dec.build_decode_state(k, v, video, l, d, ls)
    second = dec.build_decode_state(2 * k, v + 1, video.clone(), l, d, ls)  # another layer: same mask
    assert second.sel_start is first.sel_start and second.video_mask is first.video_mask
    assert not torch.equal(second.k_cmp, first.k_cmp)
    video[0] = ~video[0]  # in place
    third = dec.build_decode_state(k, v, video, l, d, ls)
    assert third.sel_start is not first.sel_start and torch.equal(third.video_mask, video)
    fresh = dec._state_tables(video.clone(), l, d, ls)
    for name in ("cmp_end", "sel_start", "sel_end", "band_first", "band_last", "txt_start", "txt_end", "n_txt",
                 "first_video"):
        assert torch.equal(getattr(third, name), getattr(fresh, name)), name


def test_radix_top_n_breaks_ties_like_the_reference(monkeypatch):
    """Equal block scores (identical keys in every block) must pick the earliest blocks, as select_block_ids."""
    B, Hq, Hkv, Tk, D = 1, 4, 2, 200, 16
    g = torch.Generator().manual_seed(6)
    k = torch.randn(1, Hkv, 1, D, generator=g).expand(B, Hkv, Tk, D).clone().to(DEV)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(DEV)
    q = torch.randn(B, Hq, 1, D, generator=g).to(DEV)
    gates = torch.rand(B, Hq, 1, 3, generator=g).to(DEV)
    video = spans(B, Tk, [[(8, 190)]]).to(DEV)
    state = dec.build_decode_state(k, v, video, 16, 16, 16)
    ref = nsa_reference(q, k, v, gates, video, None, 0.25, 16, 16, 16, 3, 8, decode="sparse")
    assert rel(dec.sparse_decode_triton(q, k, v, gates, state, 0.25, 3, 8), ref) <= 1e-5


def test_radix_top_n_over_hundreds_of_blocks_skips_cleared_digits(monkeypatch):
    """300 selection blocks: the score keys' low key_id_bits(300) = 9 bits are cleared, so the radix select runs
    3 of its 4 digit passes (the last digit is 0 everywhere); the picks must still be the reference's."""
    from nsa_compile.kernels.selection import key_id_bits

    monkeypatch.setattr(dec, "POISON_SCRATCH", True)
    B, Hq, Hkv, Tk, D, blk = 1, 6, 2, 1204, 16, 4
    assert key_id_bits(Tk // blk) == 9
    g = torch.Generator().manual_seed(8)
    q = torch.randn(B, Hq, 2, D, generator=g).to(DEV)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g).to(DEV) for _ in range(2))
    gates = torch.rand(B, Hq, 2, 3, generator=g).to(DEV)
    video = spans(B, Tk - 2, [[(0, Tk - 4)]]).to(DEV)
    state = dec.build_decode_state(k[:, :, :Tk - 2], v[:, :, :Tk - 2], video, blk, blk, blk)
    full = torch.cat([video, torch.zeros(B, 2, dtype=torch.bool, device=DEV)], 1)
    ref = nsa_reference(*(x.double() for x in (q, k, v, gates)), full, None, 0.25, blk, blk, blk, 7, 8,
                        decode="sparse")
    assert rel(dec.sparse_decode_triton(q, k, v, gates, state, 0.25, 7, 8).double(), ref) <= 1e-5


# ------------------------------------------------------------------------------------------ the op and its state
def _cfg(**kw):
    base = dict(block_size=16, block_stride=8, selection_block_size=16, top_n=3, window_size=24, decode="sparse")
    base.update(kw)
    return NSAConfig(**base)


def _layer(seed, B=2, Hq=6, Hkv=2, T=180, D=16, dtype=torch.float32):
    return tuple(x.to(DEV) for x in make(B, Hq, Hkv, T, T, D=D, dtype=dtype, seed=seed))


def _spans(B, Tk, ranges):
    return spans(B, Tk, ranges).to(DEV)


@pytest.mark.parametrize("triton_path", [False, True], ids=["reference", "triton-interpreter"])
def test_prefill_then_decode_steps_reuse_the_kept_state(triton_path, monkeypatch):
    monkeypatch.setattr(dec, "INTERPRET_ON_CPU", triton_path)
    cfg = _cfg()
    T, steps = 180, 3
    video = _spans(2, T, [[(10, 160)], [(0, 70), (80, 170)]])
    layers = [_layer(seed) for seed in (10, 11)]  # two layers: each must find its own state
    caches = []
    for q, k, v, gates in layers:
        nsa_attention(q, k, v, gates, video, cfg)
        caches.append([k, v])
    assert len(dec.STATES) == 2 and dec.STATES.stats["builds"] == 2
    g = torch.Generator().manual_seed(12)
    for step in range(steps):
        for i, (k, v) in enumerate(caches):
            kn, vn = (torch.randn(2, 2, 1, 16, generator=g).to(DEV) for _ in range(2))
            k, v = torch.cat([k, kn], 2), torch.cat([v, vn], 2)  # what DynamicCache does: a new tensor
            caches[i] = [k, v]
            q1 = torch.randn(2, 6, 1, 16, generator=g).to(DEV)
            g1 = torch.rand(2, 6, 1, 3, generator=g).to(DEV)
            out = nsa_attention(q1, k, v, g1, torch.zeros(2, 1, dtype=torch.bool, device=DEV), cfg)
            full = torch.cat([video, torch.zeros(2, step + 1, dtype=torch.bool, device=DEV)], 1)
            ref = nsa_reference(q1, k, v, g1, full, None, None, 16, 8, 16, 3, 24, decode="sparse")
            assert rel(out, ref) <= 1e-5
    assert dec.STATES.stats["builds"] == 2 and dec.STATES.stats["rebuilds"] == 0
    assert dec.STATES.stats["hits"] == 2 * steps


def test_changed_cache_is_not_matched_and_falls_back_to_dense_with_a_warning():
    cfg = _cfg()
    q, k, v, gates = _layer(20)
    video = _spans(2, 180, [[(10, 160)], [(0, 170)]])
    nsa_attention(q, k, v, gates, video, cfg)
    k2 = k.clone()
    k2[:, :, 179] += 1e-3  # the last anchored key is a probe
    k2, v2 = torch.cat([k2, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)
    q1, g1 = q[:, :, :1], gates[:, :, :1]
    with pytest.warns(UserWarning, match="no kept video state matches"):
        out = nsa_attention(q1, k2, v2, g1, torch.zeros(2, 1, dtype=torch.bool, device=DEV), cfg)
    assert rel(out.cpu(), dense_causal(q1.cpu(), k2.cpu(), v2.cpu())) <= 1e-5


def test_call_with_new_video_rebuilds_and_full_mask_overrides_the_state(monkeypatch):
    monkeypatch.setattr(dec, "INTERPRET_ON_CPU", True)
    cfg = _cfg()
    q, k, v, gates = _layer(30, T=200)
    video = _spans(2, 200, [[(10, 120), (170, 195)], [(0, 185)]])
    nsa_attention(q[:, :, :180], k[:, :, :180], v[:, :, :180], gates[:, :, :180], video[:, :180], cfg)
    # continuation of 20 tokens holding more video (text and video queries): rebuilt over the sequence mask
    out = nsa_attention(q[:, :, 180:], k, v, gates[:, :, 180:], video[:, 180:], cfg)
    ref = nsa_reference(q[:, :, 180:], k, v, gates[:, :, 180:], video, None, None, 16, 8, 16, 3, 24,
                        decode="sparse")
    assert rel(out, ref) <= 1e-5
    assert dec.STATES.stats["rebuilds"] == 1 and len(dec.STATES) == 1
    # a decode step whose mask covers all keys and disagrees with the state: the call's mask wins (rebuild)
    k1, v1 = torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)
    other = torch.cat([_spans(2, 200, [[(0, 100)], [(50, 150)]]),
                       torch.zeros(2, 1, dtype=torch.bool, device=DEV)], 1)
    out = nsa_attention(q[:, :, :1], k1, v1, gates[:, :, :1], other, cfg)
    ref = nsa_reference(q[:, :, :1], k1, v1, gates[:, :, :1], other, None, None, 16, 8, 16, 3, 24, decode="sparse")
    assert rel(out, ref) <= 1e-5
    assert dec.STATES.stats["rebuilds"] == 2


def test_gradients_prefill_ok_decode_raises():
    cfg = _cfg()
    q, k, v, gates = (x.double().requires_grad_() for x in _layer(40, T=64, B=1))
    video = _spans(1, 64, [[(4, 60)]])
    a = nsa_attention(q, k, v, gates, video, cfg)
    b = nsa_attention(q, k, v, gates, video, _cfg(decode="dense"))
    ga = torch.autograd.grad(a.sum(), (q, k, v, gates))
    gb = torch.autograd.grad(b.sum(), (q, k, v, gates))
    assert all(rel(x, y) <= 1e-12 for x, y in zip(ga, gb))
    out = nsa_attention(q[:, :, -1:], k, v, gates[:, :, -1:], video[:, -1:], cfg)
    with pytest.raises(NSAInputError, match="no backward"):
        out.sum().backward()


def test_opcheck_prefill_and_decode():
    q, k, v, gates = make(1, 4, 2, 48, 48, D=8, dtype=torch.float32)
    vm = spans(1, 48, [[(4, 44)]])
    torch.library.opcheck(torch.ops.nsa_compile.nsa_attention_sparse_decode.default,
                          (q, k, v, gates, vm, None, 0.3, 8, 8, 8, 2, 8))
    torch.library.opcheck(torch.ops.nsa_compile.nsa_attention_sparse_decode.default,
                          (q[:, :, -1:], k, v, gates[:, :, -1:], vm[:, -1:], None, 0.3, 8, 8, 8, 2, 8),
                          test_utils=("test_schema", "test_faketensor"))


def test_store_is_bounded_and_warns_on_eviction():
    cfg = _cfg()
    video = _spans(2, 180, [[(10, 160)], [(0, 170)]])
    store = dec.STATES
    old = store.max_bytes
    try:
        q, k, v, gates = _layer(50)
        nsa_attention(q, k, v, gates, video, cfg)
        store.max_bytes = int(store.nbytes * 1.5)
        q, k, v, gates = _layer(51)
        with pytest.warns(UserWarning, match="evicted"):
            nsa_attention(q, k, v, gates, video, cfg)
        assert len(store) == 1 and store.stats["evictions"] == 1
        # the same layer's prefill run again replaces its state instead of adding one
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            nsa_attention(q, k, v, gates, video, cfg)
        assert len(store) == 1
    finally:
        store.max_bytes = old


def test_config_decode_field():
    from nsa_compile.config import NSAConfigError
    assert NSAConfig().decode == "dense"
    c = NSAConfig.preset("videonsa", decode="sparse")
    assert NSAConfig.from_dict(c.to_dict()) == c and c.to_dict()["decode"] == "sparse"
    with pytest.raises(NSAConfigError, match="decode"):
        NSAConfig(decode="fast")


# ------------------------------------------------------------------------------------------ GPU
def _gpu_case(T, dtype, preset, seed=0, Hq=28, Hkv=4, D=128, steps=3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    cfg = NSAConfig.preset(preset)
    k = torch.randn(1, Hkv, T + steps, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, T + steps, D, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(1, Hq, 1, D, device="cuda", dtype=dtype, generator=g)
    gates = torch.rand(1, Hq, 1, 3, device="cuda", dtype=dtype, generator=g)
    video = torch.zeros(1, T, dtype=torch.bool, device="cuda")
    video[0, 16:T - 48] = True
    return cfg, q, k, v, gates, video


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,preset", [(4096, "videonsa"), (16384, "videonsa"), (8192, "paper")],
                         ids=["T4096-videonsa", "T16384-videonsa", "T8192-paper"])
def test_decode_kernels_gpu_against_reference(T, preset, dtype):
    cfg, q, k, v, gates, video = _gpu_case(T, dtype, preset)
    state = dec.build_decode_state(k[:, :, :T], v[:, :, :T], video, cfg.block_size, cfg.block_stride,
                                   cfg.selection_block_size)
    scale = 1 / math.sqrt(q.shape[-1])
    full = torch.cat([video, torch.zeros(1, k.shape[2] - T, dtype=torch.bool, device="cuda")], 1)
    ref = nsa_reference(q.double(), k.double(), v.double(), gates.double(), full, None, scale, cfg.block_size,
                        cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size, decode="sparse")
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    dec.sparse_decode_triton(q, k, v, gates, state, scale, cfg.top_n, cfg.window_size, out=out)
    assert rel(out.double(), ref) <= 1e-2


@pytest.mark.gpu
def test_decode_op_gpu_finds_state_and_is_cuda_graph_capturable():
    cfg, q, k, v, gates, video = _gpu_case(8192, torch.bfloat16, "videonsa")
    cfg = NSAConfig.preset("videonsa", decode="sparse")
    T = video.shape[1]
    qp = torch.randn(1, 28, T, 128, device="cuda", dtype=torch.bfloat16)
    gp = torch.rand(1, 28, T, 3, device="cuda", dtype=torch.bfloat16)
    nsa_attention(qp, k[:, :, :T], v[:, :, :T], gp, video, cfg)
    (state,) = dec.STATES._lru.values()
    full = torch.cat([video, torch.zeros(1, 3, dtype=torch.bool, device="cuda")], 1)
    out = nsa_attention(q, k, v, gates, torch.zeros(1, 1, dtype=torch.bool, device="cuda"), cfg)
    ref = nsa_reference(q.double(), k.double(), v.double(), gates.double(), full, None, None, 64, 64, 64, 32, 256,
                        decode="sparse")
    assert rel(out.double(), ref) <= 1e-2 and dec.STATES.stats["hits"] == 1
    scale = 1 / math.sqrt(128)
    static_out = torch.empty_like(out)
    dec.sparse_decode_triton(q, k, v, gates, state, scale, 32, 256, out=static_out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.sparse_decode_triton(q, k, v, gates, state, scale, 32, 256, out=static_out)
    static_out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel(static_out.double(), ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("schedule,pdl", [("spread", None), ("last", None), ("separate", False)],
                         ids=["spread-pdl", "fused-pdl", "separate"])
def test_decode_fused_launches_are_repeatable_on_gpu(schedule, pdl):
    """The fused selection hands partials from a row's programs to its last one through L2 (a ticket per row; the
    spread one also waits for them in every program), and under programmatic dependent launch the attention
    kernel starts before the compression kernel ends; a missing release/acquire or wait would make some runs
    differ. The kernels are otherwise deterministic, so every run must equal the first bit for bit, and every
    schedule must agree with the reference."""
    cfg, q, k, v, gates, video = _gpu_case(65536, torch.bfloat16, "videonsa")
    T = video.shape[1]
    state = dec.build_decode_state(k[:, :, :T], v[:, :, :T], video, cfg.block_size, cfg.block_stride,
                                   cfg.selection_block_size)
    scale = 1 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)

    def run():
        dec.sparse_decode_triton(q, k, v, gates, state, scale, cfg.top_n, cfg.window_size, out=out,
                                 schedule=schedule, pdl=pdl)

    run()
    first = out.clone()
    differ = 0
    for _ in range(300):
        run()
        differ += int(not torch.equal(out, first))
    assert differ == 0
    full = torch.cat([video, torch.zeros(1, k.shape[2] - T, dtype=torch.bool, device="cuda")], 1)
    ref = nsa_reference(q.double(), k.double(), v.double(), gates.double(), full, None, scale, cfg.block_size,
                        cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size, decode="sparse")
    assert rel(first.double(), ref) <= 1e-2


@pytest.mark.gpu
def test_decode_schedules_agree_on_gpu():
    """At 128K (shape A, ``videonsa``: the default spreads the selection where 4·32 programs fit the SMs, as on an
    H100 SXM or H200) every schedule gives the same output bit for bit (the same picks); the counters are zero
    after each; with two sequences the grid exceeds the SMs, so the default falls back to the last program and an
    explicit spread is refused."""
    cfg, q, k, v, gates, video = _gpu_case(131072, torch.bfloat16, "videonsa")
    T = video.shape[1]
    state = dec.build_decode_state(k[:, :, :T], v[:, :, :T], video, cfg.block_size, cfg.block_stride,
                                   cfg.selection_block_size)
    assert state.blocks_coincide
    scale = 1 / math.sqrt(q.shape[-1])
    fits = 4 * 32 <= torch.cuda.get_device_properties(q.device).multi_processor_count
    outs = {}
    for schedule in ("auto", "spread", "last", "separate") if fits else ("auto", "last", "separate"):
        outs[schedule] = dec.sparse_decode_triton(q, k, v, gates, state, scale, cfg.top_n, cfg.window_size,
                                                  schedule=schedule)
        torch.cuda.synchronize()
        assert not dec._counters(q.device, 8).any()
    for schedule in outs:
        assert torch.equal(outs[schedule], outs["auto"]), schedule
    assert not outs["auto"].isnan().any()
    k2, v2 = torch.cat([k, k.flip(2)]), torch.cat([v, v.flip(2)])
    state2 = dec.build_decode_state(k2[:, :, :T], v2[:, :, :T], video.expand(2, T), cfg.block_size,
                                    cfg.block_stride, cfg.selection_block_size)
    q2, g2 = q.expand(2, -1, -1, -1), gates.expand(2, -1, -1, -1)
    two = dec.sparse_decode_triton(q2, k2, v2, g2, state2, scale, cfg.top_n, cfg.window_size)
    assert torch.equal(two, dec.sparse_decode_triton(q2, k2, v2, g2, state2, scale, cfg.top_n, cfg.window_size,
                                                     schedule="last"))
    assert torch.equal(two[:1], outs["last"])
    with pytest.raises(ValueError, match="one program per SM"):
        dec.sparse_decode_triton(q2, k2, v2, g2, state2, scale, cfg.top_n, cfg.window_size, schedule="spread")
