"""The NSA reference and its op against independent formulas: a dense causal attention, a sliding-window
attention, attention over mean-pooled keys, and a per-query loop that spells out the README's semantics."""

import math

import pytest
import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels import NSAInputError, attention_budget, nsa_attention, nsa_reference


def rel(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - ref).norm() / ref.norm()).item()


def make(B=2, Hq=7, Hkv=1, Tq=160, Tk=160, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    gates = torch.rand(B, Hq, Tq, 3, generator=g, dtype=dtype)
    return q, k, v, gates


def spans(B, Tk, ranges):
    m = torch.zeros(B, Tk, dtype=torch.bool)
    for b, rs in enumerate(ranges):
        for s, e in rs:
            m[b, s:e] = True
    return m


def dense_causal(q, k, v, bias=None):
    """Naive end-aligned causal attention with GQA by repetition."""
    Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(Hq // k.shape[1], 1)
    v = v.repeat_interleave(Hq // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.arange(Tk - Tq, Tk)[:, None]
    s = s.masked_fill(torch.arange(Tk)[None, :] > p, float("-inf"))
    if bias is not None:
        s = s + bias
    return torch.softmax(s, -1) @ v


def naive_blocks(video: list[bool], l: int, d: int, ls: int):
    """(compression blocks, selection blocks) as inclusive (first, last) key positions, per video span of the
    per-position flags ``video``: compression blocks of l keys every d that fit in their span, selection blocks of
    ls keys (the last one of a span shorter)."""
    span_list, j, T = [], 0, len(video)
    while j < T:
        if video[j]:
            e = j
            while e + 1 < T and video[e + 1]:
                e += 1
            span_list.append((j, e))
            j = e + 1
        else:
            j += 1
    cblocks = [(s + c * d, s + c * d + l - 1) for s, e in span_list for c in range((e - s + 1) // d + 1)
               if s + c * d + l - 1 <= e]
    sblocks = [(s + c, min(s + c + ls - 1, e)) for s, e in span_list for c in range(0, e - s + 1, ls)]
    return cblocks, sblocks


def naive_nsa(q, k, v, gates, vm, cfg):
    """One query at a time, straight from the README's semantics (slow; small shapes only)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    l, d, ls, n, w = cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size
    scale = 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, Tq, v.shape[-1], dtype=q.dtype)

    def attend(qv, keys, kk, vv):
        if not keys:
            return torch.zeros(vv.shape[-1], dtype=q.dtype)
        kk, vv = kk[keys], vv[keys]
        return torch.softmax(kk @ qv * scale, 0) @ vv

    for b in range(B):
        video = [False] * (Tk - vm.shape[1]) + vm[b].tolist()
        cblocks, sblocks = naive_blocks(video, l, d, ls)
        for hk in range(Hkv):
            kk, vv = k[b, hk], v[b, hk]
            kc = torch.stack([kk[a:z + 1].mean(0) for a, z in cblocks]) if cblocks else None
            vc = torch.stack([vv[a:z + 1].mean(0) for a, z in cblocks]) if cblocks else None
            for i in range(Tq):
                p = Tk - Tq + i
                heads = range(hk * G, hk * G + G)
                if not video[p]:
                    for h in heads:
                        out[b, h, i] = attend(q[b, h, i], list(range(p + 1)), kk, vv)
                    continue
                vis = [c for c, (a, z) in enumerate(cblocks) if z <= p]
                own = next(sb for sb in sblocks if sb[0] <= p <= sb[1])
                cand = [s for s, (a, z) in enumerate(sblocks) if z < own[0]]
                score = torch.zeros(len(sblocks), dtype=q.dtype)
                o_cmp = {}
                for h in heads:
                    if vis:
                        pc = torch.softmax(kc[vis] @ q[b, h, i] * scale, 0)
                        o_cmp[h] = pc @ vc[vis]
                        for c, pr in zip(vis, pc):
                            for s, (a, z) in enumerate(sblocks):
                                if cblocks[c][0] <= z and cblocks[c][1] >= a:
                                    score[s] += pr
                    else:
                        o_cmp[h] = torch.zeros(v.shape[-1], dtype=q.dtype)
                chosen = sorted(cand, key=lambda s: -score[s].item())[:n]
                keys = [j for j in range(p + 1) if not video[j] or j >= own[0]
                        or any(sblocks[s][0] <= j <= sblocks[s][1] for s in chosen)]
                win = list(range(max(0, p - w + 1), p + 1))
                for h in heads:
                    g = gates[b, h, i]
                    out[b, h, i] = (g[0] * o_cmp[h] + g[1] * attend(q[b, h, i], keys, kk, vv)
                                    + g[2] * attend(q[b, h, i], win, kk, vv))
    return out


CASES = {
    # name: (B, Hq, Hkv, Tq, Tk, video ranges per row)
    "B2-HQ7-H1-T160-two-spans": (2, 7, 1, 160, 160, [[(10, 120)], [(0, 50), (70, 160)]]),
    "B1-HQ4-H2-T150-all-video": (1, 4, 2, 150, 150, [[(0, 150)]]),
    "B2-HQ6-H2-Tq40-Tk170-cache": (2, 6, 2, 40, 170, [[(30, 165)], [(100, 170)]]),
    "B1-HQ3-H3-T97-odd": (1, 3, 3, 97, 97, [[(3, 41), (44, 95)]]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_dense_equivalent_matches_dense_fp64(case):
    B, Hq, Hkv, Tq, Tk, ranges = CASES[case]
    q, k, v, _ = make(B, Hq, Hkv, Tq, Tk)
    vm = spans(B, Tk, ranges)[:, Tk - Tq:]
    cfg = NSAConfig(block_size=16, block_stride=8, selection_block_size=16, top_n=4, window_size=20).dense_equivalent()
    gates = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand(B, Hq, Tq, 3)
    assert rel(nsa_attention(q, k, v, gates, vm, cfg), dense_causal(q, k, v)) <= 1e-10


def test_dense_equivalent_with_padding_mask():
    B, Hq, Hkv, T = 2, 4, 2, 120
    q, k, v, _ = make(B, Hq, Hkv, T, T)
    vm = spans(B, T, [[(20, 100)], [(40, 120)]])
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[1, :, :, :15] = False  # left padding of row 1
    keep[1, :, :15, :15] = torch.eye(15, dtype=torch.bool)  # padded queries see themselves (like HF)
    bias = torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    cfg = NSAConfig(block_size=16, block_stride=16, selection_block_size=16).dense_equivalent()
    gates = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand(B, Hq, T, 3)
    ref = dense_causal(q, k, v, bias)
    assert rel(nsa_attention(q, k, v, gates, vm, cfg, attn_mask=keep), ref) <= 1e-10
    assert rel(nsa_attention(q, k, v, gates, vm, cfg, attn_mask=bias), ref) <= 1e-10


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("blocks", [(16, 8, 16, 2, 24), (8, 8, 16, 3, 8), (16, 4, 8, 5, 40)],
                         ids=["l16-d8-ls16-n2-w24", "l8-d8-ls16-n3-w8", "l16-d4-ls8-n5-w40"])
def test_reference_matches_per_query_loop(case, blocks):
    B, Hq, Hkv, Tq, Tk, ranges = CASES[case]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, seed=1)
    vm = spans(B, Tk, ranges)[:, Tk - Tq:]
    l, d, ls, n, w = blocks
    cfg = NSAConfig(block_size=l, block_stride=d, selection_block_size=ls, top_n=n, window_size=w)
    assert rel(nsa_attention(q, k, v, gates, vm, cfg), naive_nsa(q, k, v, gates, vm, cfg)) <= 1e-10


def test_window_only_is_sliding_window_attention():
    B, Hq, Hkv, T, w = 2, 4, 2, 130, 17
    q, k, v, _ = make(B, Hq, Hkv, T, T)
    vm = torch.ones(B, T, dtype=torch.bool)
    cfg = NSAConfig(block_size=16, block_stride=16, selection_block_size=16, top_n=2, window_size=w)
    gates = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(B, Hq, T, 3)
    i = torch.arange(T)
    band = torch.zeros(T, T, dtype=torch.float64).masked_fill((i[None] <= i[:, None] - w), float("-inf"))
    assert rel(nsa_attention(q, k, v, gates, vm, cfg), dense_causal(q, k, v, band)) <= 1e-10


def test_compression_only_is_attention_over_mean_pooled_keys():
    B, Hq, Hkv, T, l, d = 1, 4, 2, 100, 16, 8
    q, k, v, _ = make(B, Hq, Hkv, T, T)
    vm = torch.ones(B, T, dtype=torch.bool)
    cfg = NSAConfig(block_size=l, block_stride=d, selection_block_size=16, top_n=2, window_size=8)
    gates = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(B, Hq, T, 3)
    starts = torch.arange(0, T - l + 1, d)
    kc = torch.stack([k[:, :, s:s + l].mean(2) for s in starts], 2)  # F.avg_pool over each block
    vc = torch.stack([v[:, :, s:s + l].mean(2) for s in starts], 2)
    kc, vc = kc.repeat_interleave(2, 1), vc.repeat_interleave(2, 1)
    s = q @ kc.transpose(-1, -2) / math.sqrt(q.shape[-1])
    visible = (starts + l - 1)[None, :] <= torch.arange(T)[:, None]
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    assert rel(nsa_attention(q, k, v, gates, vm, cfg), p @ vc) <= 1e-10
    out = nsa_attention(q, k, v, gates, vm, cfg)
    assert out[:, :, : l - 1].abs().max() == 0  # nothing compressed yet: zero, not NaN


def test_selection_is_shared_by_gqa_group_and_no_nan_when_empty():
    # A video query at the first token of a span after text: compression is empty, selection has text + itself.
    B, Hq, Hkv, T = 1, 7, 1, 64
    q, k, v, gates = make(B, Hq, Hkv, T, T)
    vm = spans(B, T, [[(0, 64)]])
    cfg = NSAConfig(block_size=16, block_stride=16, selection_block_size=16, top_n=1, window_size=4)
    out = nsa_attention(q, k, v, gates, vm, cfg)
    assert torch.isfinite(out).all()
    assert rel(out, naive_nsa(q, k, v, gates, vm, cfg)) <= 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
def test_low_precision_against_fp64(dtype, tol):
    B, Hq, Hkv, T = 2, 7, 1, 200
    q, k, v, gates = make(B, Hq, Hkv, T, T, seed=3)
    vm = spans(B, T, [[(20, 190)], [(0, 200)]])
    cfg = NSAConfig(block_size=16, block_stride=16, selection_block_size=16, top_n=100, window_size=32)
    ref = nsa_attention(q, k, v, gates, vm, cfg)
    out = nsa_attention(q.to(dtype), k.to(dtype), v.to(dtype), gates.to(dtype), vm, cfg)
    assert out.dtype == dtype
    assert rel(out.double(), ref) <= tol


def test_gradcheck_fp64():
    B, Hq, Hkv, T = 1, 4, 2, 30
    q, k, v, gates = make(B, Hq, Hkv, T, T, D=4, seed=4)
    vm = spans(B, T, [[(3, 29)]])
    cfg = NSAConfig(block_size=4, block_stride=2, selection_block_size=4, top_n=2, window_size=5)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, gates)]
    assert torch.autograd.gradcheck(lambda *x: nsa_attention(*x, vm, cfg), inputs, eps=1e-6, atol=1e-7)


def test_op_gradients_match_reference_autograd():
    q, k, v, gates = make(2, 6, 2, 90, 90, seed=5)
    vm = spans(2, 90, [[(10, 80)], [(0, 90)]])
    cfg = NSAConfig(block_size=8, block_stride=8, selection_block_size=16, top_n=2, window_size=12)
    a = [t.clone().requires_grad_() for t in (q, k, v, gates)]
    b = [t.clone().requires_grad_() for t in (q, k, v, gates)]
    go = torch.randn(2, 6, 90, 16, dtype=torch.float64)
    nsa_attention(*a, vm, cfg).backward(go)
    nsa_reference(*b, vm, None, None, 8, 8, 16, 2, 12).backward(go)
    for x, y in zip(a, b):
        assert rel(x.grad, y.grad) <= 1e-12


def test_opcheck():
    q, k, v, gates = make(1, 4, 2, 48, 48, D=8, dtype=torch.float32)
    vm = spans(1, 48, [[(4, 44)]])
    args = (q, k, v, gates, vm, None, 0.3, 8, 8, 8, 2, 8)
    torch.library.opcheck(torch.ops.nsa_compile.nsa_attention.default, args)
    torch.library.opcheck(torch.ops.nsa_compile.nsa_attention_with_state.default, args)


def test_bad_inputs_raise_clear_errors():
    q, k, v, gates = make(1, 4, 2, 32, 32, D=8)
    vm = torch.ones(1, 32, dtype=torch.bool)
    cfg = NSAConfig()
    with pytest.raises(NSAInputError, match="multiple of key/value heads"):
        nsa_attention(q[:, :3], k, v, gates[:, :3], vm, cfg)
    with pytest.raises(NSAInputError, match="video_mask"):
        nsa_attention(q, k, v, gates, vm[:, :5], cfg)
    with pytest.raises(NSAInputError, match="gates"):
        nsa_attention(q, k, v, gates[..., :2], vm, cfg)
    with pytest.raises(NSAInputError, match="supports"):
        nsa_attention(q.int(), k.int(), v.int(), gates, vm, cfg)


def test_attention_budget_falls_with_video_length():
    def budget(T):
        vm = torch.zeros(1, T, dtype=torch.bool)
        vm[0, 100:T - 92] = True
        return attention_budget(vm, T, 64, 64, 64, 32, 256)

    long, short = budget(32768), budget(8192)
    assert long["video_tokens"] == [32768 - 192]
    assert long["dense_scores"] == 32768 * 32769 / 2
    assert long["budget"] < 0.2 < short["budget"] < 0.6


def test_attention_budget_counts_match_per_query_count_when_blocks_are_full():
    # 2 spans of whole selection blocks: count keys per query by hand.
    T, l, n, w = 96, 16, 2, 8
    vm = spans(1, T, [[(16, 48), (64, 96)]])
    b = attention_budget(vm, T, l, l, l, n, w)
    total = 0
    for p in range(T):
        if not vm[0, p]:
            total += p + 1
            continue
        own = (p // l) * l
        blocks_before = sum(1 for s in range(0, T, l) if vm[0, s] and s + l - 1 < own)
        text_before = int((~vm[0, : p + 1]).sum())
        cmp_visible = sum(1 for s in range(0, T, l) if vm[0, s] and s + l - 1 <= p)
        total += cmp_visible + min(blocks_before, n) * l + (p - own + 1) + text_before + min(w, p + 1)
    assert b["nsa_scores"] == total


def test_op_stays_one_node_under_torch_export_and_aot_autograd():
    cfg = NSAConfig(block_size=8, block_stride=8, selection_block_size=8, top_n=2, window_size=8)
    q, k, v, gates = make(1, 4, 2, 32, 32, D=8, dtype=torch.float32)
    vm = spans(1, 32, [[(4, 30)]])

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, gates, vm):
            return nsa_attention(q, k, v, gates, vm, cfg) * 2

    ep = torch.export.export(Layer(), (q, k, v, gates, vm))
    ops = [n for n in ep.graph.nodes if n.target is torch.ops.nsa_compile.nsa_attention.default]
    assert len(ops) == 1
    assert rel(ep.module()(q, k, v, gates, vm), Layer()(q, k, v, gates, vm)) <= 1e-6

    graphs = []

    def count_backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _):
            graphs.append(g)
            return g

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    torch._dynamo.reset()
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    torch.compile(Layer(), backend=count_backend)(*inputs, vm).sum().backward()
    fw, bw = graphs  # under autograd: the twin that also returns the top-n ids, which the backward takes
    assert sum(n.target is torch.ops.nsa_compile.nsa_attention_with_state.default for n in fw.graph.nodes) == 1
    back = [n for n in bw.graph.nodes if n.target is torch.ops.nsa_compile.nsa_attention_backward.default]
    assert len(back) == 1 and isinstance(back[0].args[-1], torch.fx.Node)  # the saved ids
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in inputs)
