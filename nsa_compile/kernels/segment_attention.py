"""The one Triton attention kernel every NSA branch runs on: softmax attention of a tile of query rows over a set
of key segments, with a per-row predicate that says which keys each row may see.

A tile holds ``BLOCK_T`` query positions × the ``G`` query heads of one GQA group (rows ``r = t·GP + g``, ``GP`` the
group rounded up to a power of two), so all heads of a group share every K/V load and ``tl.dot`` gets ≥ 16 rows for
any group size (NSA arXiv 2502.11089 §3.4 shares the selection across a group for the same reason; we also stack
positions, which keeps tensor cores busy when G is small, e.g. Qwen2.5-VL-7B's 7).

Modes (``MODE``):
    0 dense      keys 0 … p                      (text queries)
    1 window     keys p−w+1 … p                  (sliding-window branch)
    2 compressed compressed keys c with end[c] ≤ p (compression branch; also returns the log-sum-exp)
    3 selection  listed segments (start, length, block id): a text segment (id −1) or the row's own block is seen
                 causally, any other block only when the row selected it (selection branch)

Forward writes ``o`` (fp32) and ``lse`` (fp32, +inf for a row with nothing to see: its output is 0). Backward
recomputes the probabilities from ``lse``, accumulates dq per tile and adds dk, dv with fp32 atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DENSE, WINDOW, COMPRESSED, SELECTION = 0, 1, 2, 3


@triton.jit
def _tile_rows(tile, Tq, Tk, G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr):
    r = tl.arange(0, BLOCK_T * GP)
    t = tile * BLOCK_T + r // GP
    g = r % GP
    valid = (g < G) & (t < Tq)
    p = Tk - Tq + t
    return t, g, valid, p


@triton.jit
def _segment(MODE: tl.constexpr, i, lo, SEG, seg_base, BLOCK_N: tl.constexpr):
    """First key and length of the i-th segment (implicit BLOCK_N strides from ``lo``, or listed)."""
    if MODE == 3:
        start = tl.load(SEG + seg_base + i * 3).to(tl.int64)
        length = tl.load(SEG + seg_base + i * 3 + 1)
        sid = tl.load(SEG + seg_base + i * 3 + 2)
    else:
        start = (lo + i * BLOCK_N).to(tl.int64)
        length = BLOCK_N
        sid = -1
    return start, length, sid


@triton.jit
def _visible(MODE: tl.constexpr, c, c_ok, p, KEND, kend_base, window, sid, own, sel):
    """[rows, keys] mask of what each row sees among keys ``c``."""
    if MODE == 0:
        m = c[None, :] <= p[:, None]
    elif MODE == 1:
        m = (c[None, :] <= p[:, None]) & (c[None, :] > p[:, None] - window)
    elif MODE == 2:
        end = tl.load(KEND + kend_base + c, mask=c_ok, other=2147483647)
        m = end[None, :] <= p[:, None]
    else:
        chosen = tl.sum((sel == sid).to(tl.int32), axis=1) > 0
        row_ok = (sid == -1) | (own == sid) | chosen
        m = (c[None, :] <= p[:, None]) & row_ok[:, None]
    return m & c_ok[None, :]


@triton.jit
def _tile_plan(OWN, SEL, NSEG, b, hkv, tile, t, p, valid, Tq, Tk, Nk, n_tiles, window, HKV: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, N_SEL: tl.constexpr, U: tl.constexpr,
               MODE: tl.constexpr):
    """Per tile: the rows' own block and selected blocks (selection), where its segment list starts, and the range
    of segments to visit (first key ``lo``, count ``n_seg``)."""
    own = tl.load(OWN + b.to(tl.int64) * Tk + p, mask=valid & (MODE == 3), other=-3)
    sel = tl.load(SEL + ((b * HKV + hkv).to(tl.int64) * Tq + t)[:, None] * N_SEL + tl.arange(0, N_SEL)[None, :],
                  mask=valid[:, None] & (MODE == 3), other=-3)
    seg_base = ((b * HKV + hkv).to(tl.int64) * n_tiles + tile) * U * 3
    p_lo = Tk - Tq + tile * BLOCK_T
    p_hi = tl.minimum(p_lo + BLOCK_T, Tk)
    if MODE == 0:
        lo = 0
        n_seg = tl.cdiv(p_hi, BLOCK_N)
    elif MODE == 1:
        lo = tl.maximum(p_lo - window + 1, 0)
        n_seg = tl.cdiv(p_hi - lo, BLOCK_N)
    elif MODE == 2:
        lo = 0
        n_seg = tl.cdiv(Nk, BLOCK_N)
    else:
        lo = 0
        n_seg = tl.load(NSEG + (b * HKV + hkv) * n_tiles + tile)
    return own, sel, seg_base, lo, n_seg


@triton.jit
def _fwd(Q, K, V, O, LSE, KEND, SEG, NSEG, OWN, SEL, NEED,
         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
         Tq, Tk, Nk, n_tiles, window, scale,
         G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
         D: tl.constexpr, DV: tl.constexpr, N_SEL: tl.constexpr, U: tl.constexpr, MODE: tl.constexpr,
         PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    t, g, valid, p = _tile_rows(tile, Tq, Tk, G, GP, BLOCK_T)
    need = tl.load(NEED + b * Tq + t, mask=valid, other=0)
    if tl.max(need, axis=0) == 0:
        return
    h = hkv * G + g
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + t.to(tl.int64) * sqt
    q = tl.load(q_ptr[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh

    own, sel, seg_base, lo, n_seg = _tile_plan(OWN, SEL, NSEG, b, hkv, tile, t, p, valid, Tq, Tk, Nk, n_tiles,
                                               window, HKV, BLOCK_T, BLOCK_N, N_SEL, U, MODE)

    m_i = tl.full([BLOCK_T * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], tl.float32)
    acc = tl.zeros([BLOCK_T * GP, DV], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for i in range(0, n_seg):
        start, length, sid = _segment(MODE, i, lo, SEG, seg_base, BLOCK_N)
        c = start + n
        c_ok = (n < length) & (c < Nk)
        k = tl.load(k_base + c[:, None] * skt + d[None, :], mask=c_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(_visible(MODE, c, c_ok, p, KEND, b.to(tl.int64) * Nk, window, sid, own, sel), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(e, axis=1)
        v = tl.load(v_base + c[:, None] * svt + dv[None, :], mask=c_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(e.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    o_ptr = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + t.to(tl.int64) * sot
    tl.store(o_ptr[:, None] + dv[None, :], out, mask=valid[:, None])
    tl.store(LSE + (b.to(tl.int64) * (HKV * G) + h) * Tq + t, lse, mask=valid)


@triton.jit
def _bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV_, KEND, SEG, NSEG, OWN, SEL, NEED,
         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
         Tq, Tk, Nk, n_tiles, window, scale,
         G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
         D: tl.constexpr, DV: tl.constexpr, N_SEL: tl.constexpr, U: tl.constexpr, MODE: tl.constexpr,
         PRECISION: tl.constexpr, DKDV: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    t, g, valid, p = _tile_rows(tile, Tq, Tk, G, GP, BLOCK_T)
    need = tl.load(NEED + b * Tq + t, mask=valid, other=0)
    if tl.max(need, axis=0) == 0:
        return
    valid = valid & (need != 0)
    h = hkv * G + g
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + t.to(tl.int64) * sqt
    q = tl.load(q_ptr[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    o_off = b.to(tl.int64) * sob + h.to(tl.int64) * soh + t.to(tl.int64) * sot
    do = tl.load(DO + o_off[:, None] + dv[None, :], mask=valid[:, None], other=0.0)
    row = (b.to(tl.int64) * (HKV * G) + h) * Tq + t
    lse = tl.load(LSE + row, mask=valid, other=float("inf"))
    delta = tl.load(DELTA + row, mask=valid, other=0.0)
    kv_off = (b * HKV + hkv).to(tl.int64) * Nk
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh

    own, sel, seg_base, lo, n_seg = _tile_plan(OWN, SEL, NSEG, b, hkv, tile, t, p, valid, Tq, Tk, Nk, n_tiles,
                                               window, HKV, BLOCK_T, BLOCK_N, N_SEL, U, MODE)

    dq = tl.zeros([BLOCK_T * GP, D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for i in range(0, n_seg):
        start, length, sid = _segment(MODE, i, lo, SEG, seg_base, BLOCK_N)
        c = start + n
        c_ok = (n < length) & (c < Nk)
        k = tl.load(k_base + c[:, None] * skt + d[None, :], mask=c_ok[:, None], other=0.0)
        v = tl.load(v_base + c[:, None] * svt + dv[None, :], mask=c_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        vis = _visible(MODE, c, c_ok, p, KEND, b.to(tl.int64) * Nk, window, sid, own, sel) & valid[:, None]
        pr = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = pr * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if DKDV:
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
            dvv = tl.dot(tl.trans(pr.to(do.dtype)), do, input_precision=PRECISION)
            tl.atomic_add(DK + (kv_off + c)[:, None] * D + d[None, :], dk, mask=c_ok[:, None])
            tl.atomic_add(DV_ + (kv_off + c)[:, None] * DV + dv[None, :], dvv, mask=c_ok[:, None])
    tl.store(DQ + row[:, None] * D + d[None, :], dq * scale, mask=valid[:, None])


def _geometry(Hq: int, Hkv: int, dtype: torch.dtype = torch.bfloat16, mode: int = DENSE):
    """(G, G rounded up to a power of two, positions per tile). Contiguous-key modes take 128 rows per tile (64 in
    fp32, for shared memory); the selection mode takes 16 rows, as few positions as ``tl.dot`` allows, because a
    tile reads the union of its positions' selected blocks."""
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    rows = 16 if mode == SELECTION else 64 if dtype == torch.float32 else 128
    return G, GP, max(1, rows // GP)


def _dummies(device):
    z32 = torch.zeros(1, dtype=torch.int32, device=device)
    return z32


@dataclass
class SegmentPlan:
    """What a launch needs besides q, k, v: the mode, the rows that need it, and the mode's tables.

    Attributes:
        mode: one of DENSE, WINDOW, COMPRESSED, SELECTION; need: int8 [B, Tq] rows whose output is used;
        tk: number of key positions Tk (queries are the last Tq of them); own: int32 [B, Tk] own selection block of
        each position (−2 for text; SELECTION, a 1-element dummy otherwise); window: w (WINDOW);
        kend: int32 [B, Nk] last key position of each compressed key (COMPRESSED);
        segments: int32 [B, Hkv, n_tiles, U, 3] (start, length, block id; text chunks first, id −1) and
        counts int32 [B, Hkv, n_tiles]; selected: int32 [B, Hkv, Tq, n] block ids (−3: none); n_text: text chunks at
        the head of every segment list; block_start / block_end: long [B, Ns] selection blocks (SELECTION).
    """

    mode: int
    need: torch.Tensor
    tk: int
    own: torch.Tensor
    window: int = 1
    kend: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    block_n: int = 64
    n_text: int = 0
    block_start: torch.Tensor | None = None
    block_end: torch.Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return 0 if self.block_start is None else self.block_start.shape[1]

    @property
    def text_len(self) -> torch.Tensor:
        return self.segments[:, 0, -1, : self.n_text, 1]  # the last tile keeps every text chunk


def _args(q, k, v, plan: SegmentPlan):
    dev = q.device
    z = _dummies(dev)
    kend = plan.kend if plan.kend is not None else z
    seg = plan.segments if plan.segments is not None else z
    cnt = plan.counts if plan.counts is not None else z
    own = plan.own if plan.own is not None else z
    sel = plan.selected if plan.selected is not None else z
    n_sel = sel.shape[-1] if plan.selected is not None else 1
    U = seg.shape[-2] if plan.segments is not None else 1
    return kend, seg, cnt, own, sel, triton.next_power_of_2(n_sel), U


def segment_attention_fwd(q, k, v, scale: float, plan: SegmentPlan):
    """Forward of one mode. q [B, Hq, Tq, D]; k [B, Hkv, Nk, D]; v [B, Hkv, Nk, Dv] (Nk = Tk, or the compressed
    count in COMPRESSED mode). Returns (o fp32 [B, Hq, Tq, Dv],
    lse fp32 [B, Hq, Tq]); rows not in ``plan.need`` hold garbage."""
    B, Hq, Tq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Tk = plan.tk
    G, GP, BLOCK_T = _geometry(Hq, Hkv, q.dtype, plan.mode)
    n_tiles = triton.cdiv(Tq, BLOCK_T)
    # poisoned: a row the kernel should have written and did not shows up as NaN
    o = torch.full((B, Hq, Tq, Dv), float("nan"), dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, Tq), float("nan"), dtype=torch.float32, device=q.device)
    kend, seg, cnt, own, sel, n_sel_p2, U = _args(q, k, v, plan)
    if plan.selected is not None and n_sel_p2 != sel.shape[-1]:
        sel = torch.nn.functional.pad(sel, (0, n_sel_p2 - sel.shape[-1]), value=-3)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _fwd[(n_tiles, B * Hkv)](
        q, k, v, o, lse, kend, seg, cnt, own, sel, plan.need,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        Tq, Tk, Nk, n_tiles, plan.window, scale,
        G=G, GP=GP, HKV=Hkv, BLOCK_T=BLOCK_T, BLOCK_N=plan.block_n, D=D, DV=Dv, N_SEL=n_sel_p2, U=U,
        MODE=plan.mode, PRECISION=precision, num_stages=1 if q.dtype == torch.float32 else 2)
    return o, lse


def segment_attention_bwd(q, k, v, o, lse, do, scale: float, plan: SegmentPlan):
    """Backward of one mode: (dq [B, Hq, Tq, D], dk [B, Hkv, Nk, D], dv [B, Hkv, Nk, Dv]) in fp32; rows not in
    ``plan.need`` contribute nothing."""
    B, Hq, Tq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Tk = plan.tk
    G, GP, BLOCK_T = _geometry(Hq, Hkv, q.dtype, plan.mode)
    n_tiles = triton.cdiv(Tq, BLOCK_T)
    do = do.contiguous()
    o = o.contiguous()
    delta = (o.float() * do.float()).sum(-1).contiguous()
    dq = torch.zeros(B, Hq, Tq, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, Hkv, Nk, D, dtype=torch.float32, device=q.device)
    dvv = torch.zeros(B, Hkv, Nk, Dv, dtype=torch.float32, device=q.device)
    kend, seg, cnt, own, sel, n_sel_p2, U = _args(q, k, v, plan)
    if plan.selected is not None and n_sel_p2 != sel.shape[-1]:
        sel = torch.nn.functional.pad(sel, (0, n_sel_p2 - sel.shape[-1]), value=-3)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    do_c = do.to(q.dtype)
    _bwd[(n_tiles, B * Hkv)](
        q, k, v, do_c, lse, delta, dq, dk, dvv, kend, seg, cnt, own, sel, plan.need,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do_c.stride()[:3],
        Tq, Tk, Nk, n_tiles, plan.window, scale,
        G=G, GP=GP, HKV=Hkv, BLOCK_T=BLOCK_T, BLOCK_N=plan.block_n, D=D, DV=Dv, N_SEL=n_sel_p2, U=U,
        MODE=plan.mode, PRECISION=precision, DKDV=plan.mode != SELECTION, num_stages=1)
    if plan.mode == SELECTION:
        _selection_dkdv(q, k, v, do_c, lse, delta, dk, dvv, sel, plan, scale, precision)
    return dq, dk, dvv


@triton.jit
def _bwd_dkdv_sel(Q, K, V, DO, LSE, DELTA, DK, DV_, KSEG, OFF, TILES, OWN, SEL, NEED,
                  sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                  Tq, Tk, Nk, n_keys, n_pairs, scale,
                  G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, N_SEL: tl.constexpr,
                  PRECISION: tl.constexpr):
    """dk, dv of the selection branch without atomics: one program per key segment (a selection block or a text
    chunk) walks the query tiles that read it (a CSR list built from the tiles' segment lists)."""
    kid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    kseg = (b.to(tl.int64) * n_keys + kid) * 3
    start = tl.load(KSEG + kseg).to(tl.int64)
    length = tl.load(KSEG + kseg + 1)
    sid = tl.load(KSEG + kseg + 2)
    if length == 0:
        return
    n = tl.arange(0, BLOCK_N)
    c = start + n
    c_ok = n < length
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    k = tl.load(K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh + c[:, None] * skt + d[None, :],
                mask=c_ok[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh + c[:, None] * svt + dv[None, :],
                mask=c_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dvv = tl.zeros([BLOCK_N, DV], tl.float32)
    off = (b * HKV + hkv).to(tl.int64) * (n_keys + 1) + kid
    lo = tl.load(OFF + off)
    hi = tl.load(OFF + off + 1)
    for i in range(lo, hi):
        tile = tl.load(TILES + (b * HKV + hkv).to(tl.int64) * n_pairs + i)
        t, g, valid, p = _tile_rows(tile, Tq, Tk, G, GP, BLOCK_T)
        need = tl.load(NEED + b * Tq + t, mask=valid, other=0)
        valid = valid & (need != 0)
        h = hkv * G + g
        q = tl.load((Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + t.to(tl.int64) * sqt)[:, None] + d[None, :],
                    mask=valid[:, None], other=0.0)
        o_off = b.to(tl.int64) * sob + h.to(tl.int64) * soh + t.to(tl.int64) * sot
        do = tl.load(DO + o_off[:, None] + dv[None, :], mask=valid[:, None], other=0.0)
        row = (b.to(tl.int64) * (HKV * G) + h) * Tq + t
        lse = tl.load(LSE + row, mask=valid, other=float("inf"))
        delta = tl.load(DELTA + row, mask=valid, other=0.0)
        own = tl.load(OWN + b.to(tl.int64) * Tk + p, mask=valid, other=-3)
        sel = tl.load(SEL + ((b * HKV + hkv).to(tl.int64) * Tq + t)[:, None] * N_SEL + tl.arange(0, N_SEL)[None, :],
                      mask=valid[:, None], other=-3)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        vis = _visible(3, c, c_ok, p, OWN, 0, 0, sid, own, sel) & valid[:, None]
        pr = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = pr * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dvv += tl.dot(tl.trans(pr.to(do.dtype)), do, input_precision=PRECISION)
    kv_off = (b * HKV + hkv).to(tl.int64) * Nk
    tl.store(DK + (kv_off + c)[:, None] * D + d[None, :], dk * scale, mask=c_ok[:, None])
    tl.store(DV_ + (kv_off + c)[:, None] * DV + dv[None, :], dvv, mask=c_ok[:, None])


def _selection_dkdv(q, k, v, do, lse, delta, dk, dv, sel, plan: SegmentPlan, scale: float, precision: str):
    """Selection dk/dv through `_bwd_dkdv_sel`: invert the tiles' segment lists into, per key segment, the tiles
    that read it."""
    B, Hq, Tq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, GP, BLOCK_T = _geometry(Hq, Hkv, q.dtype, SELECTION)
    seg = plan.segments.long()  # [B, Hkv, n_tiles, U, 3]
    n_tiles, U = seg.shape[2], seg.shape[3]
    n_txt = plan.n_text
    Ns = plan.n_blocks
    # key segments: the Ns selection blocks, then the text chunks (same for every KV head)
    kseg = torch.zeros(B, Ns + n_txt, 3, dtype=torch.int32, device=q.device)
    kseg[:, :Ns] = torch.stack([plan.block_start, plan.block_end - plan.block_start + 1,
                                torch.arange(Ns, device=q.device).expand(B, -1)], -1).to(torch.int32)
    kseg[:, :Ns, 1] = torch.where(plan.block_start < plan.tk, kseg[:, :Ns, 1], 0)
    if n_txt:
        kseg[:, Ns:, 0] = seg[:, 0, 0, :n_txt, 0].to(torch.int32)
        kseg[:, Ns:, 1] = plan.text_len.to(torch.int32)
        kseg[:, Ns:, 2] = -1
    u = torch.arange(U, device=q.device)
    key = torch.where(u < n_txt, Ns + u, seg[..., 2])  # [B, Hkv, n_tiles, U]
    ok = seg[..., 1] > 0
    key = torch.where(ok, key, Ns + n_txt)  # invalid → a sentinel key past the end
    tiles = torch.arange(n_tiles, device=q.device)[None, None, :, None].expand_as(key)
    order = (key * n_tiles + tiles).reshape(B, Hkv, -1).sort(-1).values
    key_sorted, tile_sorted = order // n_tiles, order % n_tiles
    counts = torch.zeros(B, Hkv, Ns + n_txt + 1, dtype=torch.long, device=q.device)
    counts.scatter_add_(-1, key_sorted, torch.ones_like(key_sorted))
    off = torch.zeros(B, Hkv, Ns + n_txt + 1, dtype=torch.int32, device=q.device)
    off[..., 1:] = counts[..., :-1].cumsum(-1).to(torch.int32)
    tiles_csr = tile_sorted.to(torch.int32).contiguous()
    dk_sel = torch.zeros_like(dk)
    dv_sel = torch.zeros_like(dv)
    _bwd_dkdv_sel[(Ns + n_txt, B * Hkv)](
        q, k, v, do, lse, delta, dk_sel, dv_sel, kseg.contiguous(), off.contiguous(), tiles_csr, plan.own, sel,
        plan.need, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
        Tq, plan.tk, Nk, Ns + n_txt, tiles_csr.shape[-1], scale,
        G=G, GP=GP, HKV=Hkv, BLOCK_T=BLOCK_T, BLOCK_N=plan.block_n, D=D, DV=Dv, N_SEL=sel.shape[-1],
        PRECISION=precision, num_stages=1)
    dk += dk_sel
    dv += dv_sel


@triton.jit
def _group_probs(Q, KC, LSE, KEND, OUT, sqb, sqh, sqt, skb, skh, skt, Tq, Tk, Nk, t_start, C, scale,
                 G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """Compression probabilities summed over the G heads of a group, for queries t_start … t_start+C−1:
    OUT[b, hkv, t − t_start, c] = Σ_g exp(q·k_c·scale − lse) over visible compressed blocks (0 elsewhere)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    r = tl.arange(0, BLOCK_T * GP)
    tq = tile * BLOCK_T + r // GP  # chunk-relative position of each row
    t = t_start + tq
    g = r % GP
    valid = (g < G) & (tq < C) & (t < Tq)
    p = Tk - Tq + t
    h = hkv * G + g
    d = tl.arange(0, D)
    q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + t.to(tl.int64) * sqt
    q = tl.load(q_ptr[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    lse = tl.load(LSE + (b.to(tl.int64) * (HKV * G) + h) * Tq + t, mask=valid, other=float("inf"))
    k_base = KC + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    tr = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    out_rows = ((b * HKV + hkv).to(tl.int64) * C + tr) * Nk
    n = tl.arange(0, BLOCK_N)
    for j in range(0, tl.cdiv(Nk, BLOCK_N)):
        c = j * BLOCK_N + n
        c_ok = c < Nk
        k = tl.load(k_base + c[:, None].to(tl.int64) * skt + d[None, :], mask=c_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        end = tl.load(KEND + b.to(tl.int64) * Nk + c, mask=c_ok, other=2147483647)
        vis = (end[None, :] <= p[:, None]) & c_ok[None, :] & valid[:, None]
        pr = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        grp = tl.sum(tl.reshape(pr, (BLOCK_T, GP, BLOCK_N)), axis=1)
        tl.store(OUT + out_rows[:, None] + c[None, :], grp,
                 mask=((tr < C) & (t_start + tr < Tq))[:, None] & c_ok[None, :])


def group_compression_probs(q, k_cmp, lse, kend, Tk: int, scale: float, t_start: int, C: int):
    """fp32 [B, Hkv, C, Nc]: compression probabilities of queries t_start … t_start+C−1 summed over each GQA group
    (what the selection branch scores blocks with), without a per-head tensor."""
    B, Hq, Tq, D = q.shape
    Hkv, Nc = k_cmp.shape[1], k_cmp.shape[2]
    G, GP, BLOCK_T = _geometry(Hq, Hkv, q.dtype)
    out = torch.empty(B, Hkv, C, Nc, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _group_probs[(triton.cdiv(C, BLOCK_T), B * Hkv)](
        q, k_cmp, lse, kend, out, *q.stride()[:3], *k_cmp.stride()[:3], Tq, Tk, Nc, t_start, C, scale,
        G=G, GP=GP, HKV=Hkv, BLOCK_T=BLOCK_T, BLOCK_N=64, D=D, PRECISION=precision,
        num_stages=1 if q.dtype == torch.float32 else 2)
    return out
