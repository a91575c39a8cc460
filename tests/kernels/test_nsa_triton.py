"""The Triton path (`nsa_triton`) against the reference: forward and every gradient, on CPU under the Triton
interpreter (small shapes, fp32 and fp16) and on the GPU (bf16/fp16, thousands of tokens)."""

import pytest
import torch

from nsa_compile.kernels.common import NSAInputError
from nsa_compile.kernels.nsa import nsa_reference
from tests.kernels.test_nsa import make, rel, spans

triton = pytest.importorskip("triton")
from nsa_compile.kernels.nsa_triton import nsa_triton_backward, nsa_triton_forward  # noqa: E402

CASES = {
    # name: (B, Hq, Hkv, Tq, Tk, D, video ranges per row, (l, d, l', n, w))
    "B2-HQ6-H2-T80-two-spans": (2, 6, 2, 80, 80, 16, [[(10, 70)], [(0, 34), (42, 80)]], (16, 8, 16, 2, 24)),
    "B1-HQ7-H1-T90-group7": (1, 7, 1, 90, 90, 16, [[(5, 85)]], (16, 16, 16, 3, 20)),
    "B1-HQ4-H4-T56-group1-text-gaps": (1, 4, 4, 56, 56, 32, [[(3, 18), (24, 27), (32, 55)]], (8, 4, 8, 2, 10)),
    "B1-HQ16-H1-T50-group16": (1, 16, 1, 50, 50, 16, [[(0, 50)]], (8, 8, 16, 1, 12)),
    "B2-HQ6-H2-Tq20-Tk90-cache": (2, 6, 2, 20, 90, 16, [[(0, 90)], [(30, 80)]], (16, 16, 16, 2, 16)),
    "B1-HQ4-H2-T40-no-video": (1, 4, 2, 40, 40, 16, [[]], (16, 16, 16, 2, 16)),
    "B1-HQ4-H2-T60-D24-padded-head-dim": (1, 4, 2, 60, 60, 24, [[(4, 60)]], (8, 8, 8, 2, 12)),
    "B1-HQ8-H2-T48-no-window": (1, 8, 2, 48, 48, 16, [[(6, 48)]], (8, 8, 8, 2, 0)),  # selection writes the output
    # long enough for key segments (64 keys; 16 for the selection) that every row of a tile sees whole, which the
    # kernels run without a mask: compressed keys 0-63 for the tiles (32 positions in fp32) from position 256, the
    # middle two of a tile's four window segments, the text rows' first 256 keys, a selection block's later readers
    "B1-HQ2-H1-T320-unmasked-segments": (1, 2, 1, 320, 320, 16, [[(0, 300)]], (4, 4, 16, 4, 192)),
    # queries from position 62 on: the text rows' tile at 254 has a key segment ending at 255, one past its first
    # position, which must stay masked (tiles and segments aligned differently from the case above)
    "B1-HQ2-H1-Tq256-Tk318-unmasked-after-cache": (1, 2, 1, 256, 318, 16, [[(0, 250)]], (4, 4, 16, 4, 192)),
    # a video of 5 whole blocks and a partial one, text after it: the top-n's identity path (`topn_geometry`)
    "B1-HQ7-H1-T100-partial-last-block": (1, 7, 1, 100, 100, 16, [[(3, 93)]], (16, 16, 16, 3, 20)),
}


def block_structured(k, block=64, strength=1.0, seed=0):
    """Keys with a random component shared by each block of ``block`` positions: block scores then differ clearly
    (as in real video, unlike i.i.d. noise, where every block mean is ~0 and near-tied block scores make the top-n
    of a half-precision kernel and an fp32 reference differ on many rows)."""
    g = torch.Generator(device=k.device).manual_seed(seed)
    B, H, T, D = k.shape
    shared = torch.randn(B, H, -(-T // block), D, generator=g, device=k.device, dtype=torch.float32)
    return (k.float() + strength * shared.repeat_interleave(block, 2)[:, :, :T]).to(k.dtype)


def case_inputs(case, seed):
    """fp32 q, k, v, gates, the video mask (of the queries) and the op's parameters of ``case``."""
    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES[case]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=seed)
    return q, k, v, gates, spans(B, Tk, ranges)[:, Tk - Tq:], (0.5 / D ** 0.5, l, d, ls, n, w)


def run_both(case, dtype, seed=0, key_mean=0.0, forward_state=False):
    """Forward and gradients of the Triton path and of the fp64 reference on the case's random inputs; with
    ``key_mean``, every key is shifted by that many times one random vector (keys of a large common mean); with
    ``forward_state``, the backward gets the forward's top-n ids, log-sum-exps and output (the training
    op's: its selection backward then runs by key segment for groups up to 16)."""
    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES[case]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=dtype, seed=seed)
    if key_mean:
        k = (k.float() + key_mean * torch.randn(D, generator=torch.Generator().manual_seed(seed + 9))).to(dtype)
    vm = spans(B, Tk, ranges)[:, Tk - Tq:]
    params = (0.5 / D ** 0.5, l, d, ls, n, w)
    ref_in = [x.double().requires_grad_() for x in (q, k, v, gates)]  # fp64 oracle on the same rounded inputs
    ref = nsa_reference(*ref_in, vm, None, *params)
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    ref.backward(go)
    state = {}
    if forward_state:
        state = dict(selected=torch.full((B, Hkv, Tq, n), -1, dtype=torch.int32),
                     lse=torch.zeros(B, Hq, Tq, 3))
    out = nsa_triton_forward(q, k, v, gates, vm, *params, selected_out=state.get("selected"),
                             lse_out=state.get("lse"))
    grads = nsa_triton_backward(go.to(dtype), q, k, v, gates, vm, *params, **state, out=out if state else None)
    return out, ref, grads, [torch.zeros_like(x) if x.grad is None else x.grad for x in ref_in]


def check(a, b, tol, name=""):
    if b.abs().max() == 0:  # e.g. gate gradients of a sequence without video
        assert a.abs().max() == 0, name
    else:
        assert rel(a.double(), b) <= tol, name


@pytest.mark.parametrize("forward_state", [False, True], ids=["recomputed", "forward-state"])
@pytest.mark.parametrize("case,dtype,tol", [(c, torch.float32, 1e-5) for c in CASES]
                         + [(c, torch.float16, 1e-2) for c in ("B1-HQ7-H1-T90-group7",)],  # more fp16: test_fuzz
                         ids=[f"fp32-{c}" for c in CASES] + ["fp16-B1-HQ7-H1-T90-group7"])
def test_triton_interpreter_against_reference(case, dtype, tol, forward_state, monkeypatch):
    """Without the forward's state the backward recomputes the top-n and runs the selection by query tile; with it
    (the training op) the selection runs by key segment (groups up to 16). The output and dq start as NaN (neither is
    zeroed: each row's first branch sets it), so an element no branch wrote fails."""
    from nsa_compile.kernels import nsa_triton as nt

    monkeypatch.setattr(nt, "POISON_OUTPUTS", True)
    out, ref, grads, ref_grads = run_both(case, dtype, forward_state=forward_state)
    assert out.dtype == dtype
    check(out, ref.detach(), tol)
    for name, g, r in zip("qkvg", grads, ref_grads):
        check(g, r, tol, name)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_writes_every_output_element(case, monkeypatch):
    """The forward's output is not zeroed: a row's first branch sets it and the others add to it (text rows: dense;
    video rows: compression first). Started as NaN, any element left unwritten fails the comparison with the
    reference."""
    from nsa_compile.kernels import nsa_triton as nt

    monkeypatch.setattr(nt, "POISON_OUTPUTS", True)
    q, k, v, gates, vm, params = case_inputs(case, seed=5)
    out = nsa_triton_forward(q, k, v, gates, vm, *params)
    ref = nsa_reference(q.double(), k.double(), v.double(), gates.double(), vm, None, *params)
    assert not out.isnan().any() and rel(out.double(), ref) <= 1e-5


@pytest.mark.parametrize("case", ["B2-HQ6-H2-T80-two-spans", "B1-HQ2-H1-T320-unmasked-segments",
                                  "B1-HQ2-H1-Tq256-Tk318-unmasked-after-cache"])
def test_text_rows_with_keys_split_over_programs_equal_one_program(case, monkeypatch):
    """The dense branch's forward with each text tile's keys in shares (`dense_splits`: few long programs, as a
    prompt after a long video on the GPU; here every share one segment, some shares empty), merged by
    `_merge_splits`: as exact as one program per tile against the reference, every element written."""
    from nsa_compile.kernels import nsa_triton as nt
    from nsa_compile.kernels import segment_attention as sa

    q, k, v, gates, vm, params = case_inputs(case, seed=3)
    ref = nsa_reference(q.double(), k.double(), v.double(), gates.double(), vm, None, *params)
    whole = nsa_triton_forward(q, k, v, gates, vm, *params)
    splits, real = [], sa.dense_splits
    monkeypatch.setattr(sa, "DENSE_SPLIT_MIN_SEGMENTS", 1)
    monkeypatch.setattr(sa, "sm_count", lambda device: 64)
    monkeypatch.setattr(sa, "dense_splits", lambda *a: splits.append(real(*a)) or splits[-1])
    monkeypatch.setattr(nt, "POISON_OUTPUTS", True)
    out = nsa_triton_forward(q, k, v, gates, vm, *params)
    assert splits and splits[0][0] >= 2, splits  # the split ran
    assert not out.isnan().any()
    assert rel(out.double(), ref) <= 1e-5 and rel(out.double(), whole.double()) <= 1e-5


@pytest.mark.parametrize("case", ["B1-HQ4-H4-T56-group1-text-gaps", "B2-HQ6-H2-Tq20-Tk90-cache"])
def test_forward_in_kv_head_chunks_equals_one_chunk(case, monkeypatch):
    """At long context the forward runs per chunk of KV heads (of at most KV_HEAD_CHUNK_ROWS query rows): bitwise
    the output and top-n of one chunk, and as exact against the reference."""
    from nsa_compile.kernels import nsa_triton as nt

    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES[case]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=3)
    vm = spans(B, Tk, ranges)[:, Tk - Tq:]
    params = (0.5 / D ** 0.5, l, d, ls, n, w)
    whole, chunked = {}, {}
    assert nt.kv_head_chunks(B, Hkv, Hq // Hkv, Tq) == 1
    out = nsa_triton_forward(q, k, v, gates, vm, *params, _keep=whole)
    monkeypatch.setattr(nt, "KV_HEAD_CHUNK_ROWS", 1)  # every KV head its own chunk
    assert nt.kv_head_chunks(B, Hkv, Hq // Hkv, Tq) == Hkv
    out_c = nsa_triton_forward(q, k, v, gates, vm, *params, _keep=chunked)
    assert torch.equal(out, out_c) and torch.equal(whole["selected"], chunked["selected"])
    assert rel(out_c.double(), nsa_reference(q.double(), k.double(), v.double(), gates.double(), vm, None,
                                             *params)) <= 1e-5


@pytest.mark.parametrize("case", ["B1-HQ7-H1-T90-group7", "B2-HQ6-H2-T80-two-spans"])
def test_selection_forward_in_position_chunks_equals_one_chunk(case, monkeypatch):
    """The selection forward by key segment keeps its per-segment partial outputs for one chunk of positions at a
    time (`SELECTION_PARTIAL_BYTES`): with chunks of one combine tile the output equals that of one chunk up to the
    rounding of the interpreter's matrix products (a row's segments are merged in the same slot order, but a step
    gathers other rows beside it), and is as exact against the reference."""
    from nsa_compile.kernels import segment_attention as sa

    q, k, v, gates, vm, params = case_inputs(case, seed=4)
    whole = nsa_triton_forward(q, k, v, gates, vm, *params)
    chunks = []
    real = sa._selection_lists
    monkeypatch.setattr(sa, "SELECTION_PARTIAL_BYTES", 1)
    monkeypatch.setattr(sa, "_selection_lists", lambda *a, **kw: chunks.append(a[3]) or real(*a, **kw))
    chunked = nsa_triton_forward(q, k, v, gates, vm, *params)
    assert chunks and max(chunks) < q.shape[2]
    assert rel(chunked.double(), whole.double()) <= 1e-6
    assert rel(chunked.double(), nsa_reference(q.double(), k.double(), v.double(), gates.double(), vm, None,
                                               *params)) <= 1e-5


@pytest.mark.parametrize("case", ["B1-HQ7-H1-T90-group7", "B2-HQ6-H2-T80-two-spans"])
def test_selection_forward_with_blocks_cut_in_pieces_equals_whole_blocks(case, monkeypatch):
    """A selection block that many positions select is walked by several programs (`SELECTION_PIECE_STEPS`
    steps each): with pieces of one step the output equals that of whole blocks up to the interpreter's rounding
    (a step gathers the same rows), and is as exact against the reference."""
    from nsa_compile.kernels import segment_attention as sa

    q, k, v, gates, vm, params = case_inputs(case, seed=5)
    whole = nsa_triton_forward(q, k, v, gates, vm, *params)
    split = []
    real = sa._split_selection_walk
    monkeypatch.setattr(sa, "SELECTION_PIECE_STEPS", 1)
    monkeypatch.setattr(sa, "_split_selection_walk", lambda *a: split.append(real(*a)) or split[-1])
    pieces = nsa_triton_forward(q, k, v, gates, vm, *params)
    walk, seg, n_items = split[0]
    used = walk[..., :n_items, 1] > walk[..., :n_items, 0]
    assert ((seg[..., 1:] == seg[..., :-1]) & used[..., 1:]).any()  # some block was cut in pieces
    assert rel(pieces.double(), whole.double()) <= 1e-6
    assert rel(pieces.double(), nsa_reference(q.double(), k.double(), v.double(), gates.double(), vm, None,
                                              *params)) <= 1e-5


@pytest.mark.parametrize("piece,Ns,max_entries", [(1, 7, 600), (3, 7, 600), (50, 7, 600), (7, 1500, 30000)],
                         ids=["piece1", "piece3", "piece50", "piece7-1500-blocks"])
def test_selection_blocks_cut_in_pieces_cover_each_reader_once(piece, Ns, max_entries):
    """`_split_selection_walk`: the pieces of each chunk's blocks cover every reader entry of the block once, none
    longer than ``piece``, within the item count fixed without a host sync; the text segments are kept as they
    were. With piece 1, several rounds of empty items; with 1,500 blocks, the 8-warp launch of 128K tokens."""
    from nsa_compile.kernels.segment_attention import _split_selection_walk

    g = torch.Generator().manual_seed(0)
    C, BH, n_text = 3, 2, 2
    counts = torch.randint(0, 40, (C, BH, Ns), generator=g)
    counts = torch.where(counts.cumsum(-1) <= max_entries, counts, 0)
    counts[0, 0] = 0  # a chunk whose blocks nobody reads
    counts[1, 1, -1] += max_entries - counts[1, 1].sum()  # a chunk using every entry
    hi = counts.cumsum(-1)
    sel = torch.stack([hi - counts, hi], -1)
    text = torch.randint(0, 99, (C, BH, n_text, 2), generator=g)
    walk, seg, n_items = _split_selection_walk(torch.cat([sel, text], 2).to(torch.int32), Ns, piece, max_entries)
    assert walk.shape == (C, BH, n_items + n_text, 2) and seg.shape == (C, BH, n_items)
    assert torch.equal(walk[:, :, n_items:], text.to(torch.int32))
    for c in range(C):
        for bh in range(BH):
            got = {s: [] for s in range(Ns)}
            for (first, end), s in zip(walk[c, bh, :n_items].tolist(), seg[c, bh].tolist()):
                assert 0 <= end - first <= piece
                got[s] += range(first, end)
            for s in range(Ns):
                assert got[s] == list(range(*sel[c, bh, s].tolist())), (c, bh, s)


@pytest.mark.parametrize("case", ["B1-HQ7-H1-T90-group7", "B1-HQ4-H4-T56-group1-text-gaps"])
def test_selection_forward_by_key_segment_equals_by_query_tile(case, monkeypatch):
    """Groups up to `SELECTION_BY_KEY_MAX_GROUP` run the selection forward by key segment; the query-tile kernel
    (what larger groups and the backward's pass use) gives the same output and top-n on the same inputs."""
    from nsa_compile.kernels import nsa_triton as nt

    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES[case]
    assert Hq // Hkv <= nt.SELECTION_BY_KEY_MAX_GROUP
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=8)
    vm = spans(B, Tk, ranges)[:, Tk - Tq:]
    params = (0.5 / D ** 0.5, l, d, ls, n, w)
    by_key, by_tile, calls = {}, {}, []
    real = nt.selection_fwd
    monkeypatch.setattr(nt, "selection_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out_key = nsa_triton_forward(q, k, v, gates, vm, *params, _keep=by_key)
    assert calls  # the by-key kernels ran
    monkeypatch.setattr(nt, "SELECTION_BY_KEY_MAX_GROUP", 0)
    calls.clear()
    out_tile = nsa_triton_forward(q, k, v, gates, vm, *params, _keep=by_tile)
    assert not calls
    assert torch.equal(by_key["selected"], by_tile["selected"])
    assert rel(out_key.double(), out_tile.double()) <= 1e-6


@pytest.mark.parametrize("case", ["B1-HQ7-H1-T90-group7", "B2-HQ6-H2-T80-two-spans"])
def test_compression_dkdv_split_over_query_chunks(case, monkeypatch):
    """The compression branch's dk/dv walk split in chunks of one query tile (partial sums added by the host):
    gradients as exact against the reference as one walk per key block."""
    from nsa_compile.kernels import segment_attention as sa

    used = []
    real = sa.compressed_dkdv_splits
    monkeypatch.setattr(sa, "COMPRESSED_SPLIT_TILES", 1)
    monkeypatch.setattr(sa, "compressed_dkdv_splits", lambda *a: used.append(real(*a)) or used[-1])
    _, _, grads, ref_grads = run_both(case, torch.float32, seed=5)
    assert used and min(used) > 1
    for name, g, r in zip("qkvg", grads, ref_grads):
        check(g, r, 1e-5, name)


def test_gradients_with_keys_of_a_large_common_mean():
    """Keys sharing a large mean vector (common in LLM attention): the backward's one-pass dq (Σ P(dp − c)k and
    (c − rowd)·Σ Pk, see `segment_attention._fwd`) must not lose the difference to rounding in fp16."""
    _, _, grads, ref_grads = run_both("B1-HQ7-H1-T90-group7", torch.float16, seed=2, key_mean=16.0)
    for name, g, r in zip("qkvg", grads, ref_grads):
        check(g, r, 1e-2, name)


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan")])
def test_a_softmax_scale_that_is_not_positive_is_refused(scale):
    """The kernels scale each row's maximum of the raw scores (one FFMA per score), which needs scale > 0."""
    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES["B1-HQ7-H1-T90-group7"]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32)
    vm = spans(B, Tk, ranges)[:, Tk - Tq:]
    with pytest.raises(NSAInputError, match="positive softmax scale"):
        nsa_triton_forward(q, k, v, gates, vm, scale, l, d, ls, n, w)
    with pytest.raises(NSAInputError, match="positive softmax scale"):
        nsa_triton_backward(torch.randn_like(q), q, k, v, gates, vm, scale, l, d, ls, n, w)


def test_topn_identity_path_ignores_blocks_no_video_position_selects():
    """`topn_geometry` takes the top-n kernel's identity path (selection block j = compression block j) when the
    blocks coincide for every block a video position may select: also with a partial last block and text after
    the video, but not when a partial block of one span is a candidate of the next span's positions."""
    from nsa_compile.kernels.common import video_layout
    from nsa_compile.kernels.segment_attention import topn_geometry

    def identity(ranges, T=100):
        lay = video_layout(spans(1, T, [ranges]), T, 16, 16, 16)
        return topn_geometry(lay, T).identity

    assert identity([(3, 93)])  # 5 whole blocks, then 10 tokens: never a candidate
    assert identity([(0, 96)])
    assert not identity([(0, 40), (48, 96)])  # the first span's partial block precedes the second span
    assert identity([(0, 32), (40, 88)])  # spans of whole blocks


@pytest.mark.parametrize("piece", [20, 3])
def test_selection_walk_lists_every_reader_of_a_key_segment_once(piece):
    """`_selection_walk`'s lists for the selection branch's dk/dv (`_bwd_dkdv`): every (KV head, selection block,
    position that selected or owns it) once, every (text chunk, position from its first key on) once, also when a
    text chunk's readers are cut in pieces of ``piece`` positions; a pair listed twice would count its gradient
    twice, one left out would lose it."""
    from nsa_compile.kernels import nsa_triton as nt
    from nsa_compile.kernels.segment_attention import _selection_walk

    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES["B2-HQ6-H2-Tq20-Tk90-cache"]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=8)
    vm = spans(B, Tk, [[(0, 40), (52, 90)], [(30, 80)]])[:, Tk - Tq:]
    keep = {}
    nsa_triton_forward(q, k, v, gates, vm, 0.25, l, d, ls, n, w, _keep=keep)
    plan = nt._prepare(q, k, v, vm, l, d, ls, w)[2]["selection"][0]
    plan.selected = keep["selected"]
    Ns, off = plan.block_start.shape[1], Tk - Tq
    expected = []
    for b in range(B):
        for h in range(Hkv):
            for t in range(Tq):
                if plan.need[b, t]:
                    ids = [int(x) for x in plan.selected[b, h, t] if x >= 0] + [int(plan.own[b, off + t])]
                    expected += [(b * Hkv + h, i, t) for i in ids]
            for i, (start, length) in enumerate(plan.text[b].tolist()):
                if length:
                    expected += [(b * Hkv + h, Ns + i, t) for t in range(max(start - off, 0), Tq)]
    pos, walk = _selection_walk(plan, Tq, Hkv, piece)
    pieces = -(-Tq // piece)
    assert walk.shape[1] == Ns + plan.text.shape[1] * pieces
    got = []
    for bh in range(B * Hkv):
        for kid, (first, end) in enumerate(walk[bh].tolist()):
            ts = pos[bh, first:end].tolist() if kid < Ns else range(first, end)
            got += [(bh, kid if kid < Ns else Ns + (kid - Ns) // pieces, t) for t in ts]
    assert any(kid >= Ns for _, kid, _ in expected)  # the case has text chunks
    assert sorted(got) == sorted(expected)


def test_selection_dkdv_falls_back_to_smaller_tiles_beyond_shared_memory(monkeypatch):
    """A selection dk/dv configuration that does not fit the GPU's shared memory (Triton raises OutOfResources
    before launching, e.g. bf16 at head dim 256 with blocks of 128 on an H100) gives way to the next, smaller one,
    remembered for the shape; the gradients stay exact."""
    from triton.runtime.errors import OutOfResources

    from nsa_compile.kernels import segment_attention as sa

    real = sa._bwd_dkdv
    tried = []

    class TooBigFirst:  # the first (128-row) configuration "needs" more shared memory than the device has
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tried.append((kwargs["MODE"], kwargs["RT"]))
                if kwargs["MODE"] == sa.SELECTION and kwargs["num_warps"] == 8:
                    raise OutOfResources(294912, 232448, "shared memory")
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(sa, "_bwd_dkdv", TooBigFirst())
    monkeypatch.setattr(sa, "_dkdv_config", {})
    _, _, grads, ref_grads = run_both("B1-HQ7-H1-T90-group7", torch.float32, seed=6)
    for name, g, r in zip("qkvg", grads, ref_grads):
        check(g, r, 1e-5, name)
    rows = [rt * 8 for mode, rt in tried if mode == sa.SELECTION]
    assert rows == [128, 64] and list(sa._dkdv_config.values()) == [1]
    tried.clear()
    run_both("B1-HQ7-H1-T90-group7", torch.float32, seed=6)  # the same shape: straight to the configuration that fit
    assert [rt * 8 for mode, rt in tried if mode == sa.SELECTION] == [64]


class _TooBigAt:
    """Stands in for a Triton kernel: records each launch's ROWS and raises OutOfResources (as Triton does before
    launching a configuration beyond the device's shared memory) for ``rows``; other launches run ``real``."""

    def __init__(self, real, rows: int, tried: list):
        self.real, self.rows, self.tried = real, rows, tried

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, **kwargs):
            self.tried.append(kwargs["ROWS"])
            if kwargs["ROWS"] == self.rows:
                raise OutOfResources(294912, 232448, "shared memory")
            return self.real[grid](*args, **kwargs)
        return launch


def test_selection_backward_by_key_falls_back_to_smaller_tiles_beyond_shared_memory(monkeypatch):
    """The same for the selection backward by key segment (bf16 at head dim 256 with blocks of 128 needs 288 KiB
    of shared memory for 128 rows; `scripts/check_kernels_sm90.py`): its first configuration raising OutOfResources
    at the first chunk gives way to the next, remembered for the shape; the gradients stay exact (fp32, whose
    configurations start at 64 rows)."""
    from nsa_compile.kernels import segment_attention as sa

    tried = []
    monkeypatch.setattr(sa, "_selection_bwd_partials", _TooBigAt(sa._selection_bwd_partials, 64, tried))
    monkeypatch.setattr(sa, "_bwd_config", {})
    monkeypatch.setattr(sa, "SELECTION_BWD_PARTIAL_BYTES", 1)  # several chunks of positions
    out, ref, grads, ref_grads = run_both("B1-HQ7-H1-T90-group7", torch.float32, seed=6, forward_state=True)
    for name, g, r in zip("qkvg", grads, ref_grads):
        check(g, r, 1e-5, name)
    assert tried[0] == 64 and len(tried) > 2 and set(tried[1:]) == {32} and list(sa._bwd_config.values()) == [1]
    tried.clear()
    run_both("B1-HQ7-H1-T90-group7", torch.float32, seed=6, forward_state=True)  # straight to 32 rows
    assert set(tried) == {32}


def test_selection_forward_by_key_falls_back_to_smaller_tiles_beyond_shared_memory(monkeypatch):
    """The same for the selection forward by key segment (half precision at head dim 256 with blocks of 128 needed
    256 KiB of shared memory for 128 rows on two stages, its first configuration until the eighteenth session;
    `scripts/check_kernels_sm90.py`): its first configuration raising OutOfResources at the first chunk gives way
    to the next, remembered for the shape; the output stays exact (fp32, whose configurations start at 64 rows)."""
    from nsa_compile.kernels import segment_attention as sa

    tried = []
    monkeypatch.setattr(sa, "_selection_partials", _TooBigAt(sa._selection_partials, 64, tried))
    monkeypatch.setattr(sa, "_fwd_config", {})
    monkeypatch.setattr(sa, "SELECTION_PARTIAL_BYTES", 1)  # several chunks of positions
    out, ref, _, _ = run_both("B1-HQ7-H1-T90-group7", torch.float32, seed=7)
    check(out, ref, 1e-5, "out")
    assert tried[0] == 64 and len(tried) > 2 and set(tried[1:]) == {32} and list(sa._fwd_config.values()) == [1]
    tried.clear()
    out2 = run_both("B1-HQ7-H1-T90-group7", torch.float32, seed=7)[0]  # straight to 32 rows
    assert set(tried) == {32} and torch.equal(out, out2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_head_dim_256_with_selection_blocks_of_128_runs_on_gpu():
    """bf16 at head dim 256 with selection blocks of 128 and a group of 7 (the by-key selection, forward and
    backward from the forward's state): the backward's first tiles exceed an H100's shared memory; its fallback
    runs and the output and gradients match the reference. Top-4 of at most 4 earlier blocks: every row picks all
    of them, so no near tie can make the picks differ."""
    g = torch.Generator(device="cuda").manual_seed(11)
    B, Hq, Hkv, T, D, n = 1, 7, 1, 640, 256, 4
    q = torch.randn(B, Hq, T, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).bfloat16()
    gates = torch.rand(B, Hq, T, 3, device="cuda", generator=g).bfloat16()
    vm = torch.ones(B, T, dtype=torch.bool, device="cuda")
    params = (D ** -0.5, 64, 64, 128, n, 128)
    ids = torch.full((B, Hkv, T, n), -1, dtype=torch.int32, device="cuda")
    lse = torch.zeros(B, Hq, T, 3, device="cuda")
    out = nsa_triton_forward(q, k, v, gates, vm, *params, selected_out=ids, lse_out=lse)
    go = torch.randn(out.shape, device="cuda", generator=g).bfloat16()
    grads = nsa_triton_backward(go, q, k, v, gates, vm, *params, selected=ids, lse=lse, out=out)
    ref_in = [x.double().requires_grad_() for x in (q, k, v, gates)]
    ref = nsa_reference(*ref_in, vm, None, *params)
    ref.backward(go.double())
    check(out, ref, 1e-2, "out")
    for name, g_, x in zip("qkvg", grads, ref_in):
        check(g_, x.grad, 1e-2, name)


def test_forward_memory_estimate_is_the_output_plus_the_selection_partials():
    """Shape A at 128K: the forward's work memory is the output, the by-key selection's per-segment partials
    (`SELECTION_PARTIAL_BYTES`) and small tables, i.e. within dense attention's output + output (the issue's memory
    goal)."""
    from nsa_compile.kernels import nsa_triton as nt
    from nsa_compile.kernels import segment_attention as sa

    B, Hq, Hkv, T, D = 1, 28, 4, 131072, 128
    assert nt.kv_head_chunks(B, Hkv, Hq // Hkv, T) == 4
    out_bytes = B * Hq * T * D * 2
    need = nt.memory_estimate(B, Hq, Hkv, T, T, D, D, 32, backward=False)
    assert out_bytes + sa.SELECTION_PARTIAL_BYTES < need < 2 * out_bytes


GPU_CASES = {
    # name: (Hq, Hkv, D, T, video ranges per row)
    "HQ28-H4-D128-T4096-spans": (28, 4, 128, 4096, [[(100, 4000)], [(0, 1500), (1600, 4096)]]),
    "HQ28-H4-D128-T8192": (28, 4, 128, 8192, [[(64, 8192)]]),
    "HQ16-H2-D128-T8192-group8": (16, 2, 128, 8192, [[(0, 8192)]]),
    "HQ64-H4-D128-T4096-group16": (64, 4, 128, 4096, [[(0, 4096)]]),
    "HQ12-H2-D80-T4096-head-dim-80": (12, 2, 80, 4096, [[(30, 4096)]]),
    "HQ28-H4-D96-T4096-head-dim-96": (28, 4, 96, 4096, [[(0, 2000), (2100, 4096)]]),
}


def test_layout_tables_are_shared_by_equal_masks_and_rebuilt_for_changed_ones():
    """The layers of a forward share the mask's tables (`nsa_triton._tables`); a mask changed in place (the same
    tensor, other values) must not find the old tables, and the forward over it must match the reference."""
    from nsa_compile.kernels import nsa_triton as nt

    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES["B2-HQ6-H2-T80-two-spans"]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=3)
    vm = spans(B, Tk, ranges)
    first = nt._tables(vm, Tq, Tk, l, d, ls, vm.device)
    assert nt._tables(vm.clone(), Tq, Tk, l, d, ls, vm.device) is first  # equal content: found
    vm[1, 20:60] = ~vm[1, 20:60]  # in place: same tensor, same address, new spans
    changed = nt._tables(vm, Tq, Tk, l, d, ls, vm.device)
    assert changed is not first and torch.equal(changed.video_q, vm)
    params = (0.5 / D ** 0.5, l, d, ls, n, w)
    ref = nsa_reference(q.double(), k.double(), v.double(), gates.double(), vm, None, *params)
    assert rel(nsa_triton_forward(q, k, v, gates, vm, *params).double(), ref) <= 1e-5


def test_mask_cache_skips_the_comparison_only_for_the_same_unchanged_tensor(monkeypatch):
    """`MaskCache` finds the tensor it last matched without comparing contents (no host sync on a GPU); a change
    through a view (shared version counter), an equal copy and an inference tensor (no version counter) are
    compared, and a changed mask gets tables of its own."""
    from nsa_compile.kernels.common import MaskCache

    compares = []
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compares.append(1) or equal(a, b))
    cache, builds = MaskCache(), []

    def get(m):
        return cache.get(m, ("key",), lambda: builds.append(m.clone()) or len(builds))

    vm = torch.rand(2, 50, generator=torch.Generator().manual_seed(0)) < 0.5
    assert (get(vm), get(vm), len(compares)) == (1, 1, 0)  # built once, then found by identity
    assert (get(vm.clone()), len(compares)) == (1, 1)  # equal copy: compared
    assert (get(vm), len(compares)) == (1, 2)  # the entry now holds the copy: compared once more ...
    assert (get(vm), len(compares)) == (1, 2)  # ... and then no more
    vm[:, 10:20].logical_not_()  # in place through a view: the version counter moves
    assert (get(vm), len(compares)) == (2, 3) and equal(builds[-1], vm)
    with torch.inference_mode():
        frozen = vm.clone()
    assert (get(frozen), get(frozen), len(compares)) == (2, 2, 5)  # no version counter: compared every time


def test_tables_built_under_inference_mode_serve_a_later_training_call():
    """A mask's tables built in an inference-mode forward (e.g. an evaluation) are found again by a later training
    step over the same mask; they must not be inference tensors there (autograd refuses to save those)."""
    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES["B1-HQ7-H1-T90-group7"]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=4)
    vm = spans(B, Tk, ranges)
    params = (0.5 / D ** 0.5, l, d, ls, n, w)
    with torch.inference_mode():
        first = nsa_triton_forward(q, k, v, gates, vm.clone(), *params)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    out = nsa_triton_forward(*inputs, vm, *params)
    grads = nsa_triton_backward(torch.ones_like(out), *inputs, vm, *params)
    assert torch.equal(out, first) and all(torch.isfinite(g_).all() for g_ in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_triton_gpu_against_reference(dtype, case):
    from nsa_compile import NSAConfig
    from nsa_compile.kernels import nsa_attention

    Hq, Hkv, D, T, ranges = GPU_CASES[case]
    cfg = NSAConfig.preset("videonsa")
    B = len(ranges)
    q, k, v, gates = make(B, Hq, Hkv, T, T, D=D, dtype=torch.float32, seed=11)
    q, k, v, gates = (x.to(dtype) for x in (q, block_structured(k), v, gates))
    vm = spans(B, T, ranges)
    dev = [x.cuda().requires_grad_() for x in (q, k, v, gates)]
    out = nsa_attention(*dev, vm.cuda(), cfg)  # the op picks Triton on CUDA
    go = torch.randn_like(out)
    out.backward(go)
    ref_in = [x.cuda().float().requires_grad_() for x in (q, k, v, gates)]
    ref = nsa_reference(*ref_in, vm.cuda(), None, None, cfg.block_size, cfg.block_stride, cfg.selection_block_size,
                        cfg.top_n, cfg.window_size)
    ref.backward(go.float())
    errs = {"out": rel(out.float(), ref.detach())}
    for name, a, b in zip("kv", dev[1:3], ref_in[1:3]):
        errs[name] = rel(a.grad.float(), b.grad)
    # dq and the gate gradients (Σ dO·o_branch) are per row: where near-tied block scores flip a selection between
    # the half-precision kernels and the fp32 reference, that row differs. Compare the rows whose selections
    # agree, and require such flips to be rare.
    same = same_selection(q, k, v, gates, vm, cfg).cuda()  # [B, Hkv, T]
    rows = same.repeat_interleave(Hq // Hkv, 1)  # [B, Hq, T]
    for name, i in (("q", 0), ("gates", 3)):
        errs[name] = rel(dev[i].grad.float()[rows], ref_in[i].grad[rows])
    errs["same selection"] = same.float().mean().item()
    print(case, dtype, errs)
    assert errs["same selection"] > 0.95 and all(e <= 1e-2 for n, e in errs.items() if n != "same selection"), errs


@pytest.mark.gpu
def test_text_rows_on_a_side_stream_are_repeatable_on_gpu():
    """The dense launch (text rows) of the forward, and the backward's pass over them, run on a side stream beside
    the video rows' launches, joined before the results are used: a text prompt after a video must come out the
    same in every run, bit for bit (output and gradients), also when a kernel on the caller's stream reads them at
    once, and the text rows match the reference."""
    from nsa_compile import NSAConfig
    from nsa_compile.kernels import nsa_attention

    cfg = NSAConfig.preset("videonsa")
    Hq, Hkv, D, T = 28, 4, 128, 8192
    q, k, v, gates = (x.to(torch.bfloat16).cuda() for x in make(1, Hq, Hkv, T, T, D=D, dtype=torch.float32,
                                                                   seed=12))
    vm = spans(1, T, [[(16, T - 48)]]).cuda()  # 16 text tokens, video, a 48-token prompt
    first = nsa_attention(q, k, v, gates, vm, cfg) * 1  # the copy runs on the caller's stream
    differ = sum(int(not torch.equal(nsa_attention(q, k, v, gates, vm, cfg) * 1, first)) for _ in range(30))
    assert differ == 0
    ref = nsa_reference(q.float(), k.float(), v.float(), gates.float(), vm, None, None, cfg.block_size,
                        cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size)
    text = ~vm[0]
    assert rel(first[:, :, text].float(), ref[:, :, text]) <= 1e-2
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    go = torch.randn_like(first)
    grads = lambda: [g_ * 1 for g_ in torch.autograd.grad(nsa_attention(*inputs, vm, cfg), inputs, go)]  # noqa: E731
    g0 = grads()
    assert sum(int(not all(map(torch.equal, grads(), g0))) for _ in range(10)) == 0
    ref_in = [x.float().requires_grad_() for x in (q, k, v, gates)]
    nsa_reference(*ref_in, vm, None, None, cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n,
                  cfg.window_size).backward(go.float())
    assert rel(g0[0][:, :, text].float(), ref_in[0].grad[:, :, text]) <= 1e-2  # text rows: dense attention only


def check_chunk(out, selected, q, k, v, gates, vm, c0, c1, scale, params, tie=1e-2):
    """Queries c0 … c1−1 of a long half-precision forward against the fp32 reference computed on that chunk alone
    (causality: it needs only the keys before c1).

    ``selected``: long [B, Hkv, T, n] the kernels' top-n block ids (−1: none). A video row whose selection differs
    from the reference's must be a near tie: it picked as many blocks, each with a reference score within ``tie``
    (relative) of the reference's n-th best; otherwise the test fails. The output is compared on the rows whose
    selections agree (≤ 1e-2). Returns bool [B, Hkv, c1−c0]: the rows that agree (text rows count as agreeing)."""
    from nsa_compile.kernels.common import video_layout
    from nsa_compile.kernels.compression import compression_reference
    from nsa_compile.kernels.selection import candidate_scores, select_block_ids

    l, d, ls, n, _ = params
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G, C = Hq // Hkv, c1 - c0
    ref = nsa_reference(q[:, :, c0:c1].float(), k[:, :, :c1].float(), v[:, :, :c1].float(),
                        gates[:, :, c0:c1].float(), vm[:, :c1], None, scale, *params)
    layout = video_layout(vm, T, l, d, ls)
    pos = torch.arange(c0, c1, device=q.device)
    _, p = compression_reference(q[:, :, c0:c1].float().reshape(B, Hkv, G, C, D), k.float(), v.float(), layout,
                                 scale, positions=pos)
    ref_ids = select_block_ids(p, layout, pos, n)  # [B, Hkv, C, n']
    ours = selected[:, :, c0:c1, :ref_ids.shape[-1]].long()
    ours = torch.where(ours < 0, -1, ours)
    video = layout.is_video[:, None, c0:c1]  # [B, 1, C]
    same = (ours.sort(-1).values == ref_ids.sort(-1).values).all(-1) | ~video
    scores = candidate_scores(p, layout, pos)  # [B, Hkv, C, Ns], −1: not a candidate
    nth = scores.sort(-1, descending=True).values[..., ref_ids.shape[-1] - 1]  # the reference's n-th best
    picked = scores.gather(-1, ours.clamp_min(0))
    near = (((picked >= nth[..., None] * (1 - tie)) | (ours < 0)).all(-1)
            & ((ours >= 0).sum(-1) == (ref_ids >= 0).sum(-1)))
    unexplained = ~same & ~near
    assert not unexplained.any(), (f"queries {c0}…{c1 - 1}: {int(unexplained.sum())} rows select other blocks than "
                                   f"the reference, not near ties (first at {unexplained.nonzero()[0].tolist()})")
    rows = same.repeat_interleave(G, 1)
    err = rel(out[:, :, c0:c1].float()[rows], ref[rows])
    assert same.float().mean() > 0.8 and err <= 1e-2, (c0, c1, same.float().mean().item(), err)
    return same


@pytest.mark.gpu
@pytest.mark.parametrize("T", [32768, 131072])
def test_triton_gpu_long_against_chunked_reference(T):
    """Qwen2.5-VL-7B's attention shape at 32K and 128K tokens (bf16, videonsa): the forward against the fp32
    reference on query chunks spread over the sequence (`check_chunk`: selections equal up to near ties)."""
    from nsa_compile import NSAConfig

    cfg = NSAConfig.preset("videonsa")
    C = 512
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(1, 28, T, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = block_structured(torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16, generator=g), seed=6)
    v = torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    gates = torch.rand(1, 28, T, 3, device="cuda", dtype=torch.bfloat16, generator=g)
    vm = torch.ones(1, T, dtype=torch.bool, device="cuda")
    vm[:, :200] = False  # a text prompt before the video
    params = (cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size)
    keep = {}
    with torch.no_grad():
        out = nsa_triton_forward(q, k, v, gates, vm, 128 ** -0.5, *params, _keep=keep)
        assert not torch.isnan(out).any()
        ours = keep["selected"]  # [1, 4, T, n]
        for c1 in (C, 8 * C, T // 2 + 77, T - 3 * C, T):
            check_chunk(out, ours, q, k, v, gates, vm, c1 - C, c1, 128 ** -0.5, params)


def same_selection(q, k, v, gates, vm, cfg):
    """bool [B, Hkv, T]: the Triton path and the fp32 reference select the same blocks."""
    from nsa_compile.kernels.common import video_layout
    from nsa_compile.kernels.compression import compression_reference
    from nsa_compile.kernels.selection import select_block_ids

    keep = {}
    qc, kc, vc, gc = (x.cuda() for x in (q, k, v, gates))
    scale = q.shape[-1] ** -0.5
    params = (cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size)
    nsa_triton_forward(qc, kc, vc, gc, vm.cuda(), scale, *params, _keep=keep)
    ours = keep["selected"].long()
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    layout = video_layout(vm.cuda(), T, cfg.block_size, cfg.block_stride, cfg.selection_block_size)
    ids = []
    for c0 in range(0, T, 1024):
        q5 = qc.float()[:, :, c0:c0 + 1024].reshape(B, Hkv, Hq // Hkv, -1, D)
        _, p = compression_reference(q5, kc.float(), vc.float(), layout, scale, positions=torch.arange(
            c0, min(T, c0 + 1024), device="cuda"))
        ids.append(select_block_ids(p, layout, torch.arange(c0, min(T, c0 + 1024), device="cuda"), cfg.top_n))
    ref = torch.cat(ids, 2)
    ours = torch.where(ours < 0, -1, ours)[..., : ref.shape[-1]]
    return (ours.sort(-1).values == ref.sort(-1).values).all(-1).cpu()


def test_key_padding_masks_reach_the_kernels():
    """A causal mask and left padding (as transformers builds them, bool or additive float) reduce to key validity
    and the Triton path with it matches the reference with the mask; any other mask is refused (reference)."""
    from nsa_compile.kernels.nsa import key_padding

    B, Hq, Hkv, T, D = 2, 6, 2, 64, 16
    q, k, v, gates = make(B, Hq, Hkv, T, T, D=D, dtype=torch.float32, seed=3)
    vm = spans(B, T, [[(10, 56)], [(16, 64)]])
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :9] = False  # row 1 left-padded by 9 tokens
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal[None, None] & pad[:, None, None, :]
    # bool and additive forms reduce to the same key validity, so one kernel run covers both
    for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))):
        key_valid = key_padding(m, B, T, T)
        assert key_valid is not None and torch.equal(key_valid, pad)
    params = (0.3, 8, 8, 8, 2, 12)
    ref_in = [x.double().requires_grad_() for x in (q, k, v, gates)]
    ref = nsa_reference(*ref_in, vm, mask, *params)
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref.backward(go)
    ids, lse = torch.full((B, Hkv, T, params[4]), -1, dtype=torch.int32), torch.zeros(B, Hq, T, 3)
    out = nsa_triton_forward(q, k, v, gates, vm, *params, key_valid=key_valid, selected_out=ids,
                             lse_out=lse)
    check(out, ref.detach(), 1e-5, "out")
    # both backwards: recomputing, and with the forward's state (the selection by key segment)
    for state in ({}, dict(selected=ids, lse=lse, out=out)):
        grads = nsa_triton_backward(go.float(), q, k, v, gates, vm, *params, key_valid=key_valid, **state)
        for name, g, r in zip("qkvg", grads, [x.grad for x in ref_in]):
            check(g, r, 1e-5, name)
    # not key padding: a query-dependent hole, a per-head difference, a finite bias
    hole = mask.clone()
    hole[0, 0, 50, 20] = False
    heads = mask.expand(B, Hq, T, T).clone()
    heads[0, 1, -1, 30] = False
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    bias[0, 0, 40, 3] = -1.0
    for m in (hole, heads, bias):
        assert key_padding(m, B, T, T) is None


def topn_against_reference(q, k, v, vm, l, d, ls, n):
    """(run, ref, layout) for queries q [B, Hq, T, D] over keys k, v [B, Hkv, T, D] (one device) with video mask vm:
    ``run(geometry=None)`` is `select_topn` on the compression log-sum-exp computed by torch (fp32), ``ref`` the
    reference's ids (`select_block_ids` of `compression_reference`'s probabilities), −1 on text rows."""
    from nsa_compile.kernels.common import video_layout
    from nsa_compile.kernels.compression import compress_kv, compression_reference
    from nsa_compile.kernels.segment_attention import select_topn
    from nsa_compile.kernels.selection import select_block_ids

    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    scale = D ** -0.5
    layout = video_layout(vm, T, l, d, ls)
    k_cmp, _ = compress_kv(k, v, layout)
    kend = layout.cmp_block_end.clamp(max=2**31 - 1).to(torch.int32).contiguous()
    pos = torch.arange(T, device=q.device)
    s = torch.einsum("bhtd,bhcd->bhtc", q, k_cmp.repeat_interleave(Hq // Hkv, 1)) * scale
    lse = torch.where(kend[:, None, None, :] <= pos[None, None, :, None], s, float("-inf")).logsumexp(-1)
    need = vm.to(torch.int8).contiguous()
    args = (q, k_cmp.contiguous(), lse.float().contiguous(), kend, layout, need, n, scale)
    _, p = compression_reference(q.reshape(B, Hkv, Hq // Hkv, T, D), k, v, layout, scale)
    ref = torch.where(vm[:, None, :, None], select_block_ids(p, layout, pos, n), -1)
    return (lambda geometry=None: select_topn(*args, geometry)), ref, layout


@pytest.mark.parametrize("D", [32, 256])
def test_topn_kernel_loops_over_many_overlapping_compression_blocks(D):
    """`select_topn` with stride 1, where each selection block overlaps l′ + l − 1 compression blocks (a long
    run-time loop in the kernel; it once unrolled it and ran out of shared memory at head dim 256 on the H100),
    against `select_block_ids` of the reference's compression probabilities (fp32, interpreter or GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, Hq, Hkv, T, (l, d, ls, n) = 1, 4, 2, 40, (8, 1, 8, 3)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(device) for h in (Hq, Hkv, Hkv))
    vm = torch.ones(B, T, dtype=torch.bool, device=device)
    vm[:, :3] = False
    run, ref, layout = topn_against_reference(q, k, v, vm, l, d, ls, n)
    ours = run()
    assert ours.shape == ref.shape
    assert int((layout.cmp_block_end[0, 1:] - layout.cmp_block_start[0, 1:]).min()) == l - 1  # stride 1
    assert torch.equal(ours.long().sort(-1).values, ref.sort(-1).values)


def test_topn_kernel_reads_coinciding_blocks_directly():
    """When every selection block is the compression block of the same index (spans that are whole blocks, l = d =
    l′, as ``videonsa``), `select_topn` skips the block-band tables (``identity``); its ids equal those of the
    general path and of the reference. A span with a partial block turns it off."""
    from nsa_compile.kernels.common import video_layout
    from nsa_compile.kernels.segment_attention import topn_geometry

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, Hq, Hkv, T, D, l, n = 2, 6, 2, 72, 16, 8, 3
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(device) for h in (Hq, Hkv, Hkv))
    vm = torch.zeros(B, T, dtype=torch.bool, device=device)
    vm[0, 8:72] = True
    vm[1, 0:24] = True
    vm[1, 40:64] = True
    partial = vm.clone()
    partial[1, 24:28] = True  # a span of 28 tokens: its last selection block has no compression block
    assert not topn_geometry(video_layout(partial, T, l, l, l), T).identity
    run, ref, layout = topn_against_reference(q, k, v, vm, l, l, l, n)
    geo = topn_geometry(layout, T)
    assert geo.identity and geo.W == 1
    direct, banded = run(geo), run(geo._replace(identity=False))
    assert (direct >= 0).sum() > B * Hkv * 40  # most video rows have n candidates
    assert torch.equal(direct, banded)
    assert torch.equal(direct.long().sort(-1).values, ref.sort(-1).values)


def test_compressed_keys_are_padded_to_a_multiple_of_16():
    """The compression branch's keys, values and end table have a multiple of 16 rows (Triton's divisibility
    specialisation); the padding rows are zero and end at 2**31 − 1, so no query sees them (the forward and backward
    tests above compare the results with the reference)."""
    from nsa_compile.kernels.nsa_triton import _prepare

    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES["B2-HQ6-H2-T80-two-spans"]
    q, k, v, _ = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=3)
    layout, _, branches = _prepare(q, k, v, spans(B, Tk, ranges), l, d, ls, w)
    plan, k_cmp, v_cmp = branches["compression"]
    Nc = layout.num_cmp_blocks
    assert Nc % 16 and k_cmp.shape[2] == v_cmp.shape[2] == plan.kend.shape[1] == -(-Nc // 16) * 16
    assert bool((plan.kend[:, Nc:] == 2**31 - 1).all()) and bool((plan.kend[:, :Nc] < 2**31 - 1).any())
    assert k_cmp[:, :, Nc:].abs().sum() == 0 and v_cmp[:, :, Nc:].abs().sum() == 0


def test_dense_walk_lists_the_text_tiles_that_see_each_key_block():
    """`_dense_walk`: for every key block, the entries first … end−1 of the tile list are exactly the query tiles
    that hold a text row and are not wholly before the block (brute force over tiles)."""
    from nsa_compile.kernels.segment_attention import _dense_walk

    B, Hkv, Tq, Tk, BLOCK_T, BLOCK_N = 2, 2, 70, 90, 4, 8
    need = torch.zeros(B, Tq, dtype=torch.int8)
    need[0, :5] = 1
    need[0, 33] = 1
    need[0, 66:] = 1
    need[1, 40:42] = 1
    n_keys = -(-Tk // BLOCK_N)
    pos, walk = _dense_walk(need, Tk, BLOCK_T, BLOCK_N, n_keys, Hkv)
    n_tiles = -(-Tq // BLOCK_T)
    assert pos.shape == (B * Hkv, n_tiles) and walk.shape == (B * Hkv, n_keys, 2)
    for bh in range(B * Hkv):
        b = bh // Hkv
        for kid in range(n_keys):
            want = [t for t in range(n_tiles) if need[b, t * BLOCK_T:(t + 1) * BLOCK_T].any()
                    and (t + 1) * BLOCK_T - 1 + Tk - Tq >= kid * BLOCK_N]
            lo, hi = walk[bh, kid].tolist()
            assert pos[bh, lo:hi].tolist() == want, (bh, kid)


def test_selection_dkdv_of_text_keys_in_pieces_equals_the_reference(monkeypatch):
    """The selection branch's dk/dv of text keys walks each text chunk's readers in pieces with partial sums
    (`segment_attention.SELECTION_TEXT_PIECE` positions at least), summed by `_add_text_partials`: with pieces of
    4 positions the gradients still equal the fp64 reference's (fp32, 1e-5)."""
    from nsa_compile.kernels import segment_attention as sa

    monkeypatch.setattr(sa, "SELECTION_TEXT_PIECE", 4)
    used = []
    real = sa._add_text_partials
    monkeypatch.setattr(sa, "_add_text_partials", lambda *a: used.append(a[-1]) or real(*a))
    out, ref, grads, ref_grads = run_both("B1-HQ4-H4-T56-group1-text-gaps", torch.float32, seed=6)
    assert used and max(used) > 1  # the text chunks' walks were cut in several pieces
    check(out, ref, 1e-5, "out")
    for name, g_, r in zip("qkvg", grads, ref_grads):
        check(g_, r, 1e-5, name)


@pytest.mark.parametrize("case", ["B1-HQ7-H1-T90-group7", "B1-HQ4-H4-T56-group1-text-gaps"])
def test_selection_backward_by_key_runs_in_position_chunks(case, monkeypatch):
    """With the forward's state the selection backward runs by key segment (`selection_bwd`), one chunk of
    positions at a time (as many as fit in 1.5× the size of dO, or `SELECTION_BWD_PARTIAL_BYTES` when larger; text
    chunks' readers in pieces summed over the chunks): with several chunks, and with one, every gradient equals the
    fp64 reference's (fp32, 1e-5)."""
    from nsa_compile.kernels import segment_attention as sa

    Tq = CASES[case][3]
    chunks = []
    real = sa._selection_lists
    monkeypatch.setattr(sa, "_selection_lists", lambda *a, **kw: chunks.append(a[3]) or real(*a, **kw))
    for partial_bytes in (1, 1 << 30):
        monkeypatch.setattr(sa, "SELECTION_BWD_PARTIAL_BYTES", partial_bytes)
        chunks.clear()
        out, ref, grads, ref_grads = run_both(case, torch.float32, seed=8, forward_state=True)
        check(out, ref, 1e-5, "out")
        for name, g_, r in zip("qkvg", grads, ref_grads):
            check(g_, r, 1e-5, name)
        backward_chunk = chunks[-1]  # the forward's lists (group ≤ 8) come first
        assert backward_chunk < Tq if partial_bytes == 1 else backward_chunk == Tq


@pytest.mark.parametrize("case", ["B1-HQ7-H1-T90-group7", "B1-HQ4-H4-T56-group1-text-gaps"])
def test_by_key_partials_indexed_in_64_bits_equal_32_bits(case, monkeypatch):
    """The by-key selection kernels index in int32 (fewer instructions per step) and switch to int64 once an
    offset into their partials, queries, dO, gates or reader lists reaches `BY_KEY_INT32_MAX` (the backward's
    partials may be as large as dO: 2³¹ elements at 256K tokens × 64 heads × 128 dims). Forced to int64 here:
    bitwise the same output and gradients."""
    from nsa_compile.kernels import segment_attention as sa

    out32, _, grads32, _ = run_both(case, torch.float32, seed=5, forward_state=True)
    monkeypatch.setattr(sa, "BY_KEY_INT32_MAX", 0)
    out64, _, grads64, _ = run_both(case, torch.float32, seed=5, forward_state=True)
    assert torch.equal(out32, out64)
    assert all(torch.equal(a, b) for a, b in zip(grads32, grads64))


def test_by_key_kernels_switch_to_int64_offsets_at_two_to_the_31():
    """`_indices_need_int64` counts the last element's offset from sizes and strides (a view of a larger tensor
    reaches as far as its strides take it): queries of 256K tokens × 64 heads × 128 dims need int64, one token
    fewer does not, nor a smaller view, but a strided view spanning 2³¹ elements does; empty tensors count 0."""
    from nsa_compile.kernels.segment_attention import _indices_need_int64

    small = torch.empty(4, device="meta")
    assert _indices_need_int64(small, torch.empty(1, 64, 262144, 128, device="meta"))
    assert not _indices_need_int64(small, torch.empty(1, 64, 262143, 128, device="meta"))
    big = torch.empty(1, 3, 2**30, device="meta")
    assert not _indices_need_int64(big[:, :1])
    assert _indices_need_int64(big[:, ::2, :1])  # 2 elements, the second 2³¹ away
    assert not _indices_need_int64(torch.empty(0, device="meta"), small)


@pytest.mark.parametrize("case", list(CASES))
def test_backward_reuses_the_forward_topn(case):
    """The forward's top-n ids (``selected_out``) handed to the backward give the gradients of the backward's own
    top-n (the picks agree on these inputs: bit for bit), equal the ids the forward selected with, and are used:
    ids of no block change the gradients wherever selection runs."""
    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES[case]
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=3)
    vm = spans(B, Tk, ranges)[:, Tk - Tq:]
    params = (0.5 / D ** 0.5, l, d, ls, n, w)
    ids = torch.full((B, Hkv, Tq, n), -1, dtype=torch.int32)
    keep = {}
    out = nsa_triton_forward(q, k, v, gates, vm, *params, _keep=keep, selected_out=ids)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    own = nsa_triton_backward(go, q, k, v, gates, vm, *params)
    reused = nsa_triton_backward(go, q, k, v, gates, vm, *params, selected=ids)
    assert all(torch.equal(a, b) for a, b in zip(reused, own))
    if keep["selected"] is None:  # no video: nothing selected
        assert (ids == -1).all()
        return
    assert torch.equal(ids[..., :keep["selected"].shape[-1]], keep["selected"])
    if (ids >= 0).any():
        none = nsa_triton_backward(go, q, k, v, gates, vm, *params, selected=torch.full_like(ids, -1))
        assert not torch.equal(none[0], own[0])


def test_training_op_runs_the_kernels_and_their_backward(monkeypatch):
    """``nsa_attention`` under autograd runs ``nsa_attention_with_state`` (here forced onto the Triton path on CPU):
    output and gradients as the fp64 reference, and the ids it saves are the forward's."""
    from nsa_compile import NSAConfig
    from nsa_compile.kernels import nsa as nsa_mod

    monkeypatch.setattr(nsa_mod, "_route", lambda q, k, v, m: (True, None))
    B, Hq, Hkv, Tq, Tk, D, ranges, (l, d, ls, n, w) = CASES["B2-HQ6-H2-T80-two-spans"]
    cfg = NSAConfig(block_size=l, block_stride=d, selection_block_size=ls, top_n=n, window_size=w)
    q, k, v, gates = make(B, Hq, Hkv, Tq, Tk, D=D, dtype=torch.float32, seed=5)
    vm = spans(B, Tk, ranges)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    out = nsa_mod.nsa_attention(*inputs, vm, cfg)
    assert "nsa_attention_with_state" in out.grad_fn.name()
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(go)
    ref_in = [x.double().requires_grad_() for x in (q, k, v, gates)]
    ref = nsa_reference(*ref_in, vm, None, None, l, d, ls, n, w)
    ref.backward(go.double())
    assert rel(out.double(), ref) <= 1e-5
    for a, b in zip(inputs, ref_in):
        assert rel(a.grad.double(), b.grad) <= 1e-5
    with torch.no_grad():
        assert torch.equal(nsa_mod.nsa_attention(q, k, v, gates, vm, cfg), out.detach())
