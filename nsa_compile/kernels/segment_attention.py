"""The Triton kernels of the NSA op: one softmax-attention kernel that every branch runs on (a tile of query rows
over a list of key segments, with a per-row predicate of which keys each row sees), its backward, and the top-n
block selection of the selection branch.

A tile holds ``BLOCK_T`` query positions × the ``G`` query heads of one GQA group (rows ``r = t·GP + g``, ``GP`` the
group rounded up to a power of two), so all heads of a group share every K/V load and ``tl.dot`` gets ≥ 16 rows for
any group size, unpadded in memory (NSA arXiv 2502.11089 §3.4 loads a whole GQA group per query for the same
reason; stacking positions keeps tensor cores busy when G is small, e.g. Qwen2.5-VL-7B's 7).

Modes (``MODE``):
    0 dense      keys 0 … p                      (text queries)
    1 window     keys p−w+1 … p                  (sliding-window branch, NSA §3.3.3)
    2 compressed compressed keys c with end[c] ≤ p (compression branch, NSA §3.3.1; also gives the log-sum-exp)
    3 selection  per position: its top-n blocks and its own block (causally), plus every earlier text key
                 (selection branch, NSA §3.3.2)

Forward (`segment_attention_fwd`) adds ``gate · o`` of each needed row to the output in its dtype (so the gated
combination of NSA eq. 5 needs no per-branch output tensor; a row's first branch sets it), or, in the backward's
pass over the same keys, writes
the per-row ``Σ_d dO·o`` that both the gate gradient and the softmax backward need and adds the rows' dq. Softmax
statistics are fp32 whatever the input dtype. `segment_attention_bwd` then adds dk, dv per key segment (each key is
owned by one program that walks the query tiles reading it; the compression branch's walk is split in chunks summed
in a fixed order), with no atomics: forward and backward are bitwise reproducible run to run.

`select_topn` is the selection branch's block scoring and top-n (NSA §3.3.2, eqs. 8-11) in one kernel: it
recomputes the compression probabilities from the compression branch's log-sum-exp, sums them over the GQA group
and keeps a running top-n per position in registers, so no [tokens × blocks] tensor exists in memory. Its
reference is `selection.select_block_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .common import sm_count

DENSE, WINDOW, COMPRESSED, SELECTION = 0, 1, 2, 3
# Softmaxes run in log2 units (scores · scale · log2 e, then exp2: a bare MUFU.EX2 per element where exp adds a
# range fix-up); log-sum-exps are stored in natural-log units (· ln 2).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _rows(Q, NEED, tile, bh, sqb, sqh, sqt, Tq, Tk, G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr,
          BLOCK_T: tl.constexpr, D: tl.constexpr, RT: tl.constexpr):
    """The rows of ``RT`` tiles (``tile``: a scalar for RT = 1, else int32 [RT·BLOCK_T·GP], each row's tile; a tile
    ≥ cdiv(Tq, BLOCK_T) makes its rows invalid): batch, KV head, position index t, tile-local position, validity,
    key position p, the fp32 row index into [B, Hq, Tq] tensors and the queries [rows, D]."""
    b = bh // HKV
    hkv = bh % HKV
    r = tl.arange(0, RT * BLOCK_T * GP)
    t_loc = (r // GP) % BLOCK_T
    t = tile * BLOCK_T + t_loc
    g = r % GP
    valid = (g < G) & (t < Tq)
    p = Tk - Tq + t
    h = hkv * G + g
    need = tl.load(NEED + b * Tq + t, mask=valid, other=0) != 0
    row = (b.to(tl.int64) * (HKV * G) + h) * Tq + t
    d = tl.arange(0, D)
    q_ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + t.to(tl.int64) * sqt
    q = tl.load(q_ptr[:, None] + d[None, :], mask=(valid & need)[:, None], other=0.0)
    return b, hkv, t, t_loc, valid & need, p, row, q


@triton.jit
def _n_segments(MODE: tl.constexpr, tile, b, Tq, Tk, n_txt, window, CMP_N, BLOCK_T: tl.constexpr,
                BLOCK_N: tl.constexpr, NSEL: tl.constexpr):
    """First key ``lo`` and number of key segments a tile visits (COMPRESSED: CMP_N int32 [B, tiles] holds how
    many compressed keys the tile's last position sees)."""
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
        n_seg = tl.cdiv(tl.load(CMP_N + b * tl.num_programs(0) + tile), BLOCK_N)
    else:
        lo = 0
        n_seg = n_txt + BLOCK_T * (NSEL + 1)
    return lo, n_seg


@triton.jit
def _segment(MODE: tl.constexpr, i, lo, b, hkv, tile, Tq, n_txt, TXT, SEG, HKV: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, NSEL: tl.constexpr):
    """First key, length and owner of the i-th key segment of a tile. Owner −1: every row of the tile may see it
    (causally); owner j: only the rows of the tile's j-th position (selection: its selected blocks and own block,
    read from the (start, length) table `select_topn` wrote)."""
    if MODE == 3:
        if i < n_txt:  # a chunk of earlier text keys, shared by all positions
            start = tl.load(TXT + (b * n_txt + i) * 2).to(tl.int64)
            length = tl.load(TXT + (b * n_txt + i) * 2 + 1)
            owner = i * 0 - 1
        else:  # slot (i − n_txt) mod (n+1) of position j: one of its n selected blocks, or (slot n) its own block
            j = (i - n_txt) // (NSEL + 1)
            ok = tile * BLOCK_T + j < Tq
            e = (((b * HKV + hkv).to(tl.int64) * Tq + tile * BLOCK_T) * (NSEL + 1) + (i - n_txt)) * 2
            start = tl.load(SEG + e, mask=ok, other=0).to(tl.int64)
            length = tl.load(SEG + e + 1, mask=ok, other=0)
            owner = j
    else:
        start = (lo + i * BLOCK_N).to(tl.int64)
        length = BLOCK_N
        owner = -1
    return start, length, owner


@triton.jit
def _visible(MODE: tl.constexpr, c, c_ok, p, t_loc, KEND, kend_base, window, owner, KVALID, kv_base,
             HAS_KMASK: tl.constexpr):
    """[rows, keys] mask of what each row sees among keys ``c`` of one segment; with HAS_KMASK, token keys
    (not the compressed ones) must also be valid in KVALID (an attention mask's key padding)."""
    c32 = c.to(tl.int32)  # positions < 2³¹: int32 compares (one instruction each, not two)
    if MODE == 0:
        m = c32[None, :] <= p[:, None]
    elif MODE == 1:
        m = (c32[None, :] <= p[:, None]) & (c32[None, :] > p[:, None] - window)
    elif MODE == 2:
        end = tl.load(KEND + kend_base + c, mask=c_ok, other=2147483647)
        m = end[None, :] <= p[:, None]
    else:
        m = (c32[None, :] <= p[:, None]) & ((owner < 0) | (t_loc == owner))[:, None]
    if HAS_KMASK and MODE != 2:
        m = m & (tl.load(KVALID + kv_base + c, mask=c_ok, other=0) != 0)[None, :]
    return m & c_ok[None, :]


@triton.jit
def _segment_masked(MODE: tl.constexpr, start, Nk, p_first, p_last, window, KEND, kend_base,
                    BLOCK_N: tl.constexpr, HAS_KMASK: tl.constexpr):
    """Whether rows at positions p_first … p_last need `_visible`'s mask on the keys start … start+BLOCK_N−1 of a
    contiguous segment (DENSE, WINDOW, COMPRESSED modes): not when every key exists and every row sees it, as for
    all but the last compressed segments of a tile and the inner ones of its window (FlashAttention's unmasked
    blocks). Rows not needed take no mask: their q is 0, their output unstored, their backward terms 0."""
    c_hi = start + BLOCK_N - 1
    if MODE == 3 or (HAS_KMASK and MODE != 2):
        return c_hi >= 0
    elif MODE == 0:
        return (c_hi >= Nk) | (c_hi > p_first)
    elif MODE == 1:
        return (c_hi >= Nk) | (c_hi > p_first) | (start <= p_last - window)
    else:
        end = tl.load(KEND + kend_base + c_hi, mask=c_hi < Nk, other=2147483647)
        return end > p_first


# n_txt is not specialised: Triton's specialisation of an integer argument equal to 1 (one chunk of text keys, e.g.
# a prompt's first tokens before a video) made the selection branch ~13 % slower on an H100 at 128K (23.1 against
# 20.5 ms per KV head; BENCHMARKS.md, eleventh session).
@triton.jit(do_not_specialize=["n_txt"])
def _fwd(Q, K, V, OUT, LSE, ROWD, DO, DQ, GATE, KEND, CMP_N, TXT, SEG, NEED, KVALID, TILES, PO, PL,
         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
         Tq, Tk, Nk, Ns, n_txt, window, scale, dv_out, seg_per,
         G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
         D: tl.constexpr, DV: tl.constexpr, NSEL: tl.constexpr, GI: tl.constexpr, MODE: tl.constexpr,
         PRECISION: tl.constexpr, HAS_KMASK: tl.constexpr, BWD: tl.constexpr, OUT_IN: tl.constexpr,
         LSE_IN: tl.constexpr, SPLIT: tl.constexpr):
    """Online-softmax pass of one tile over its key segments; LSE[row] = log-sum-exp (+inf for a row that sees
    nothing: its o is 0). Rows not needed are left untouched.

    BWD=False (forward): the row's gate·o goes to OUT (strides sob, soh, sot; its first dv_out columns, in its
    dtype), added to what OUT holds there when OUT_IN. BWD=True (the backward's pass): ROWD[row] = Σ_d dO·o and
    DQ[row] gets the branch's dq (added to what it holds when OUT_IN), in the same pass. With P = softmax,
    dp_j = dO·v_j, rowd = Σ_j P_j dp_j and delta = gate·rowd, the softmax backward's
    dq = scale · Σ_j P_j (gate·dp_j − delta) k_j
    = scale · gate · (Σ_j P_j (dp_j − c) k_j + (c − rowd) Σ_j P_j k_j) for any c; both sums are accumulated online
    (rescaled with the running max like o) before rowd is known, with c per row the P-weighted mean of dp over the
    row's first visible segment, so the bf16-rounded terms P_j (dp_j − c) are small like the usual P_j (dp_j −
    delta). LSE_IN (backward only): LSE holds the forward's log-sum-exp, read instead of written, and P_j = exp(s_j
    − lse) directly: no running maximum, nothing rescaled per step (FlashAttention-2's backward).

    SPLIT (the dense branch's forward, `dense_splits`): program (i, bh, s) takes tile TILES[i] and its key
    segments s·seg_per … (s+1)·seg_per − 1, and stores the rows' softmax over them alone, normalised, to PO (fp32
    [S, B·HKV, len(TILES), rows, DV]) and its log-sum-exp to PL (−inf: no key), for `_merge_splits`."""
    tile = tl.program_id(0)
    if SPLIT:
        tile = tl.load(TILES + tile)
    b, hkv, t, t_loc, valid, p, row, q = _rows(Q, NEED, tile, tl.program_id(1), sqb, sqh, sqt, Tq, Tk, G, GP, HKV,
                                               BLOCK_T, D, 1)
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    lo, n_seg = _n_segments(MODE, tile, b, Tq, Tk, n_txt, window, CMP_N, BLOCK_T, BLOCK_N, NSEL)
    if SPLIT:  # this program's share of the tile's segments (none past the tile's last)
        lo = lo + tl.program_id(2) * seg_per * BLOCK_N
        n_seg = tl.minimum(n_seg - tl.program_id(2) * seg_per, seg_per)

    m_i = tl.full([BLOCK_T * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], tl.float32)
    acc = tl.zeros([BLOCK_T * GP, DV], tl.float32)  # forward: Σ e_j v_j
    a1 = tl.zeros([BLOCK_T * GP, D], tl.float32)  # backward: Σ e_j (dp_j − c) k_j
    a2 = tl.zeros([BLOCK_T * GP, D], tl.float32)  # backward: Σ e_j k_j
    edp = tl.zeros([BLOCK_T * GP], tl.float32)  # backward: Σ e_j dp_j
    c_ref = tl.zeros([BLOCK_T * GP], tl.float32)
    o_ptr = row[:, None] * DV + dv[None, :]
    if BWD:
        do = tl.load(DO + o_ptr, mask=valid[:, None], other=0.0)
    if LSE_IN:  # the forward's log-sum-exp: P directly, no running max, nothing to rescale
        lse2 = tl.load(LSE + row, mask=valid, other=float("inf")) * LOG2E
    n = tl.arange(0, BLOCK_N)
    p_first = Tk - Tq + tile * BLOCK_T
    for i in range(0, n_seg):  # no branch on empty segments (their loads are masked): the loop can pipeline
        start, length, owner = _segment(MODE, i, lo, b, hkv, tile, Tq, n_txt, TXT, SEG, HKV, BLOCK_T, BLOCK_N, NSEL)
        c = start + n
        c_ok = (n < length) & (c < Nk)
        k = tl.load(k_base + c[:, None] * skt + d[None, :], mask=c_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # unscaled: the scale (> 0) goes into one FFMA
        masked = _segment_masked(MODE, start, Nk, p_first, p_first + BLOCK_T - 1, window, KEND, b.to(tl.int64) * Nk,
                                 BLOCK_N, HAS_KMASK)
        if LSE_IN:
            e = tl.math.exp2(s * (scale * LOG2E) - lse2[:, None])
            if masked:
                e = tl.where(_visible(MODE, c, c_ok, p, t_loc, KEND, b.to(tl.int64) * Nk, window, owner, KVALID,
                                      b.to(tl.int64) * Tk, HAS_KMASK), e, 0.0)
            e_sum = tl.sum(e, axis=1)
            v = tl.load(v_base + c[:, None] * svt + dv[None, :], mask=c_ok[:, None], other=0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            e_dp = tl.sum(e * dp, axis=1)
            c_ref = tl.where(l_i == 0.0, e_dp / tl.where(e_sum == 0.0, 1.0, e_sum), c_ref)
            edp += e_dp
            a1 += tl.dot((e * (dp - c_ref[:, None])).to(k.dtype), k, input_precision=PRECISION)
            a2 += tl.dot(e.to(k.dtype), k, input_precision=PRECISION)
            l_i += e_sum
        else:
            if masked:
                s = tl.where(_visible(MODE, c, c_ok, p, t_loc, KEND, b.to(tl.int64) * Nk, window, owner, KVALID,
                                      b.to(tl.int64) * Tk, HAS_KMASK), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * (scale * LOG2E))  # log2 units: exp2, no range fix-up
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            e = tl.math.exp2(s * (scale * LOG2E) - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            e_sum = tl.sum(e, axis=1)
            v = tl.load(v_base + c[:, None] * svt + dv[None, :], mask=c_ok[:, None], other=0.0)
            if BWD:
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                e_dp = tl.sum(e * dp, axis=1)
                c_ref = tl.where(l_i == 0.0, e_dp / tl.where(e_sum == 0.0, 1.0, e_sum), c_ref)
                edp = edp * alpha + e_dp
                a1 = a1 * alpha[:, None] + tl.dot((e * (dp - c_ref[:, None])).to(k.dtype), k,
                                                  input_precision=PRECISION)
                a2 = a2 * alpha[:, None] + tl.dot(e.to(k.dtype), k, input_precision=PRECISION)
            else:
                acc = acc * alpha[:, None] + tl.dot(e.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + e_sum
            m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if SPLIT:
        rows = tl.arange(0, BLOCK_T * GP)
        part = ((tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0)
                + tl.program_id(0)).to(tl.int64) * (BLOCK_T * GP) + rows
        tl.store(PL + part, tl.where(valid & ~empty, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf")))
        tl.store(PO + part[:, None] * DV + dv[None, :], acc / l_safe[:, None])
        return
    if not LSE_IN:
        tl.store(LSE + row, tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2), mask=valid)
    gate = 1.0
    if GI >= 0:
        gate = tl.load(GATE + row * 3 + GI, mask=valid, other=0.0)
    if BWD:
        rowd = edp / l_safe
        tl.store(ROWD + row, rowd, mask=valid)
        dq = (a1 + (c_ref - rowd)[:, None] * a2) * (gate * scale / l_safe)[:, None]
        dq_ptr = DQ + row[:, None] * D + d[None, :]
        if OUT_IN:
            dq += tl.load(dq_ptr, mask=valid[:, None], other=0.0)
        tl.store(dq_ptr, dq, mask=valid[:, None])
    else:
        _write_rows(acc / l_safe[:, None], gate, OUT, b, hkv, t, valid, sob, soh, sot, dv_out, G, GP, BLOCK_T, DV,
                    GI, OUT_IN)


@triton.jit
def _write_rows(o, gate, OUT, b, hkv, t, valid, sob, soh, sot, dv_out, G: tl.constexpr, GP: tl.constexpr,
                BLOCK_T: tl.constexpr, DV: tl.constexpr, GI: tl.constexpr, OUT_IN: tl.constexpr):
    """A branch's rows o [rows, DV] (fp32) into the gated sum (NSA eq. 5): gate·o, plus what OUT holds there when
    OUT_IN, to OUT in its dtype (its first dv_out columns)."""
    dv = tl.arange(0, DV)
    if GI >= 0:
        o = o * gate[:, None]
    h = hkv * G + tl.arange(0, BLOCK_T * GP) % GP
    out_ptr = OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + t.to(tl.int64) * sot
    out_ok = valid[:, None] & (dv < dv_out)[None, :]
    if OUT_IN:
        o += tl.load(out_ptr[:, None] + dv[None, :], mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr[:, None] + dv[None, :], o.to(OUT.dtype.element_ty), mask=out_ok)


@triton.jit
def _merge_partial(m_i, l_i, acc, lp, o, seen):
    """One more (log-sum-exp lp, normalised output o) of a row's parts into its running merge (max m, Σ e^{lse − m},
    Σ e^{lse − m} o); a part not ``seen`` (lp = −inf) adds nothing."""
    m_new = tl.maximum(m_i, lp)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    w = tl.where(seen, tl.exp(lp - m_safe), 0.0)
    return m_new, l_i * alpha + w, acc * alpha[:, None] + w[:, None] * o


@triton.jit
def _merged_rows(m_i, l_i, acc, LSE, b, hkv, g, t, valid, Tq, G: tl.constexpr, HKV: tl.constexpr):
    """The merged rows' output acc / l and index into [B, Hq, Tq] tensors; LSE[row] = m + log l (+inf for a row
    that saw nothing)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    row = (b.to(tl.int64) * (HKV * G) + hkv * G + g) * Tq + t
    tl.store(LSE + row, tl.where(empty, float("inf"), m_i + tl.log(l_safe)), mask=valid)
    return acc / l_safe[:, None], row


@triton.jit
def _merge_splits(PO, PL, OUT, LSE, TILES, NEED, sob, soh, sot, Tq, n_split, dv_out, G: tl.constexpr,
                  GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr, DV: tl.constexpr,
                  OUT_IN: tl.constexpr):
    """The rows of tile TILES[program 0] and (batch, KV head) program 1 from the n_split partial softmaxes `_fwd`
    stored with SPLIT: o = Σ_s e^{lse_s − lse} o_s, lse = log Σ_s e^{lse_s} (in split order: deterministic);
    LSE[row] = lse (+inf for a row that sees nothing), o to OUT as `_write_rows` (no gate)."""
    tile = tl.load(TILES + tl.program_id(0))
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    r = tl.arange(0, BLOCK_T * GP)
    g = r % GP
    t = tile * BLOCK_T + r // GP
    valid = (g < G) & (t < Tq)
    valid = valid & (tl.load(NEED + b * Tq + t, mask=valid, other=0) != 0)
    dv = tl.arange(0, DV)
    m_i = tl.full([BLOCK_T * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], tl.float32)
    acc = tl.zeros([BLOCK_T * GP, DV], tl.float32)
    for s in range(0, n_split):
        part = ((s * tl.num_programs(1) + bh) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * (
            BLOCK_T * GP) + r
        lp = tl.load(PL + part, mask=valid, other=float("-inf"))
        seen = lp != float("-inf")
        o = tl.load(PO + part[:, None] * DV + dv[None, :], mask=seen[:, None], other=0.0)
        m_i, l_i, acc = _merge_partial(m_i, l_i, acc, lp, o, seen)
    o, _ = _merged_rows(m_i, l_i, acc, LSE, b, hkv, g, t, valid, Tq, G, HKV)
    _write_rows(o, 1.0, OUT, b, hkv, t, valid, sob, soh, sot, dv_out, G, GP, BLOCK_T, DV, -1, OUT_IN)


@triton.jit
def _segment_kv(K, V, b, hkv, start, length, Nk, skb, skh, skt, svb, svh, svt, BLOCK_N: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr):
    """Key positions c, their validity (c < start + length, c < Nk) and the K [BLOCK_N, D], V [BLOCK_N, DV] tiles of
    the key segment starting at ``start`` (zeros past its end)."""
    n = tl.arange(0, BLOCK_N)
    c = start + n
    c_ok = (n < length) & (c < Nk)
    k = tl.load(K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh + c[:, None] * skt + tl.arange(0, D)[None, :],
                mask=c_ok[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hkv.to(tl.int64) * svh + c[:, None] * svt + tl.arange(0, DV)[None, :],
                mask=c_ok[:, None], other=0.0)
    return c, c_ok, k, v


@triton.jit
def _dkdv_step(dk, dvv, i, k, v, c, c_ok, Q, DO, GATE, LSE, DELTA, KEND, KVALID, POS, NEED, kid, bh, b, t_hi,
               n_tiles, n_pos, Ns, sqb, sqh, sqt, Tq, Tk, Nk, window, scale, step, G: tl.constexpr,
               GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               GI: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr, HAS_KMASK: tl.constexpr,
               RT: tl.constexpr, MASKED: tl.constexpr):
    """One step of `_bwd_dkdv`: dk, dv of its key segment plus the terms of the query rows of tiles i … i+RT−1
    (by list in DENSE and SELECTION modes). MASKED=False: every row sees every key (no [rows, keys] mask; rows not
    valid add 0: their q and dO are 0, their log-sum-exp +inf)."""
    dv = tl.arange(0, DV)
    e = i + step
    if MODE == 3:
        listed = tl.load(POS + bh.to(tl.int64) * n_pos + e, mask=e < tl.where(kid < Ns, t_hi, 0), other=n_tiles)
        tile = tl.where(kid < Ns, listed, tl.where(e < t_hi, e, n_tiles))
    elif MODE == 0:
        tile = tl.load(POS + bh.to(tl.int64) * n_pos + e, mask=e < t_hi, other=n_tiles)
    else:
        tile = tl.where(e < t_hi, e, n_tiles)
    _, _, t, t_loc, valid, p, row, q = _rows(Q, NEED, tile, bh, sqb, sqh, sqt, Tq, Tk, G, GP, HKV, BLOCK_T, D, RT)
    # no branch on steps without valid rows (their loads are masked, their P is 0): the loop can pipeline
    # dO as loaded: the gate scales the [rows, BLOCK_N] products below, not dO's [rows, DV] (one multiply per
    # score instead of a conversion, a multiply and a rounding per dO element)
    do = tl.load(DO + row[:, None] * DV + dv[None, :], mask=valid[:, None], other=0.0).to(Q.dtype.element_ty)
    lse = tl.load(LSE + row, mask=valid, other=float("inf"))
    delta = tl.load(DELTA + row, mask=valid, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)  # log2 units
    pr = tl.math.exp2(s - (lse * LOG2E)[:, None])
    if MASKED:
        if MODE == 3:  # every listed position reads the block (causally); text: every later position
            vis = (c.to(tl.int32)[None, :] <= p[:, None]) & c_ok[None, :]
            if HAS_KMASK:
                vis = vis & (tl.load(KVALID + b.to(tl.int64) * Tk + c, mask=c_ok, other=0) != 0)[None, :]
        else:
            vis = _visible(MODE, c, c_ok, p, t_loc, KEND, b.to(tl.int64) * Nk, window, -1, KVALID,
                           b.to(tl.int64) * Tk, HAS_KMASK)
        pr = tl.where(vis & valid[:, None], pr, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if GI >= 0:  # dS = P (gate·dP − delta), dv += (gate·P)ᵀ dO
        gate = tl.load(GATE + row * 3 + GI, mask=valid, other=0.0)
        ds = pr * (gate[:, None] * dp - delta[:, None])
        pv = pr * gate[:, None]
    else:
        ds = pr * (dp - delta[:, None])
        pv = pr
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dvv += tl.dot(tl.trans(pv.to(do.dtype)), do, input_precision=PRECISION)
    return dk, dvv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, GATE, LSE, DELTA, DK, DV_, KEND, TXT, BSTART, BLEN, NEED, KVALID, WALK, POS, TDK, TDV,
              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
              Tq, Tk, Nk, Ns, n_txt, n_pieces, n_tiles, n_pos, window, scale, split,
              G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, GI: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr,
              HAS_KMASK: tl.constexpr, RT: tl.constexpr, SPLIT: tl.constexpr):
    """DK, DV += one branch's gradient of one key segment (program kid, bh), walking the query rows that read it,
    ``RT`` tiles per step. SELECTION mode (``BLOCK_T`` = 1: a tile is one position): WALK int32 [B·Hkv, Ns + n_txt,
    2] = (first, end) from `_selection_walk`: for selection block kid < Ns the positions POS[bh, first:end] that
    selected it or own it, for piece j of text chunk i (kid = Ns + i·n_pieces + j) the positions first … end−1,
    whose partial sums go to TDK, TDV (fp32 [B·Hkv, n_txt·n_pieces, BLOCK_N, ·], zeroed and summed by the host:
    every video position reads a prompt's text keys, too long a walk for one program). DENSE mode (text rows): key block
    kid and the query tiles POS[bh, first:end] (WALK [B·Hkv, key blocks, 2], `_dense_walk`): those holding text rows
    from the first that sees the block on. Other modes: key block kid and the contiguous range of query tiles that
    see it; SPLIT: program (kid, bh, s) walks only tiles [s·split, (s+1)·split) and stores its partial sums in slice
    s of DK, DV (fp32 [splits, B, Hkv, Nk, ·], summed by the host) instead of adding to them. WINDOW and
    COMPRESSED modes run the steps whose rows all see every key of the segment in a loop of their own, without the
    [rows, keys] mask (H100, shape A at 128K: 22.7 → 21.6 ms; a branch per step instead cost 0.5 ms)."""
    kid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    off = Tk - Tq  # key position of query 0
    if MODE == 0 or MODE == 3:
        walk = WALK + (bh.to(tl.int64) * tl.num_programs(0) + kid) * 2
        t_lo = tl.load(walk)
        t_hi = tl.load(walk + 1)
    if MODE == 3:
        if kid < Ns:
            start = tl.load(BSTART + b.to(tl.int64) * Ns + kid).to(tl.int64)
            length = tl.load(BLEN + b.to(tl.int64) * Ns + kid)
        else:
            txt = (kid - Ns) // n_pieces
            start = tl.load(TXT + (b * n_txt + txt) * 2).to(tl.int64)
            length = tl.load(TXT + (b * n_txt + txt) * 2 + 1)
    else:
        start = (kid * BLOCK_N).to(tl.int64)
        length = BLOCK_N
        if MODE == 1:
            first = start
            last = start + BLOCK_N - 1 + window
        elif MODE == 2:
            first = tl.load(KEND + b.to(tl.int64) * Nk + start, mask=start < Nk, other=2147483647).to(tl.int64)
            last = Tk
        if MODE != 0:  # DENSE walks its list (above)
            t_lo = (tl.maximum(first - off, 0) // BLOCK_T).to(tl.int32)
            t_hi = tl.minimum(tl.cdiv(tl.maximum(last - off, 0), BLOCK_T), n_tiles).to(tl.int32)
        if SPLIT:
            t_lo = tl.maximum(t_lo, tl.program_id(2) * split)
            t_hi = tl.minimum(t_hi, tl.program_id(2) * split + split)
    c, c_ok, k, v = _segment_kv(K, V, b, hkv, start, length, Nk, skb, skh, skt, svb, svh, svt, BLOCK_N, D, DV)
    if tl.max(c_ok.to(tl.int32), axis=0) == 0:
        return
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dvv = tl.zeros([BLOCK_N, DV], tl.float32)
    step = tl.arange(0, RT * BLOCK_T * GP) // (BLOCK_T * GP)  # each row's tile among the RT of a step
    i_a = t_hi  # steps i < i_a (and i ≥ i_b) take the mask; i_a ≤ i < i_b none: their rows see every key
    i_b = t_hi
    if (MODE == 1 and not HAS_KMASK) or MODE == 2:
        full = start + BLOCK_N <= Nk
        if MODE == 2:  # the segment's last key's block end (keys ascend)
            c_end = tl.load(KEND + b.to(tl.int64) * Nk + start + BLOCK_N - 1, mask=full, other=0).to(tl.int64)
        else:
            c_end = start + BLOCK_N - 1
        # the first tile whose positions see all keys (none for a segment past the keys); non-negative operands
        # throughout: Triton's integer division truncates toward zero
        first_whole = tl.where(full, tl.cdiv(tl.maximum(c_end - off, 0), BLOCK_T), t_hi)
        i_a = tl.minimum(t_lo + tl.cdiv(tl.maximum(first_whole - t_lo, 0), RT) * RT, t_hi).to(tl.int32)
        if MODE == 1:  # ... up to the last step whose last position p still sees the first key (p − window < start)
            reach = start + window - off  # steps i with (i + RT)·BLOCK_T ≤ reach
            n_whole = tl.maximum(reach // BLOCK_T - i_a, 0) // RT
            i_b = tl.minimum(i_a + n_whole * RT, t_hi).to(tl.int32)
    for i in range(t_lo, i_a, RT):
        dk, dvv = _dkdv_step(dk, dvv, i, k, v, c, c_ok, Q, DO, GATE, LSE, DELTA, KEND, KVALID, POS, NEED, kid, bh, b,
                             t_hi, n_tiles, n_pos, Ns, sqb, sqh, sqt, Tq, Tk, Nk, window, scale, step, G, GP, HKV,
                             BLOCK_T, D, DV, GI, MODE, PRECISION, HAS_KMASK, RT, True)
    for i in range(i_a, i_b, RT):
        dk, dvv = _dkdv_step(dk, dvv, i, k, v, c, c_ok, Q, DO, GATE, LSE, DELTA, KEND, KVALID, POS, NEED, kid, bh, b,
                             t_hi, n_tiles, n_pos, Ns, sqb, sqh, sqt, Tq, Tk, Nk, window, scale, step, G, GP, HKV,
                             BLOCK_T, D, DV, GI, MODE, PRECISION, HAS_KMASK, RT, False)
    for i in range(i_b, t_hi, RT):
        dk, dvv = _dkdv_step(dk, dvv, i, k, v, c, c_ok, Q, DO, GATE, LSE, DELTA, KEND, KVALID, POS, NEED, kid, bh, b,
                             t_hi, n_tiles, n_pos, Ns, sqb, sqh, sqt, Tq, Tk, Nk, window, scale, step, G, GP, HKV,
                             BLOCK_T, D, DV, GI, MODE, PRECISION, HAS_KMASK, RT, True)
    kv_off = (tl.program_id(2) * tl.num_programs(1) + bh).to(tl.int64) * Nk
    pk = DK + (kv_off + c)[:, None] * D + d[None, :]
    pv = DV_ + (kv_off + c)[:, None] * DV + dv[None, :]
    if MODE == 3:  # a piece of a text chunk's readers: its own slice of TDK, TDV (zeros: the sum below adds none)
        tp = (bh.to(tl.int64) * (tl.num_programs(0) - Ns) + kid - Ns) * BLOCK_N + tl.arange(0, BLOCK_N)
        pk = tl.where(kid >= Ns, TDK + tp[:, None] * D + d[None, :], pk)
        pv = tl.where(kid >= Ns, TDV + tp[:, None] * DV + dv[None, :], pv)
    dk = dk * scale
    if not SPLIT:
        dk += tl.load(pk, mask=c_ok[:, None], other=0.0)
        dvv += tl.load(pv, mask=c_ok[:, None], other=0.0)
    tl.store(pk, dk, mask=c_ok[:, None])
    tl.store(pv, dvv, mask=c_ok[:, None])


@triton.jit
def _by_key_segment(K, V, BSTART, BLEN, TXT, KVALID, kid, b, hkv, Tk, Ns, n_txt, n_pieces,
                    skb, skh, skt, svb, svh, svt, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    HAS_KMASK: tl.constexpr):
    """Key segment ``kid`` of a by-key selection launch (selection block kid < Ns, else a piece of text chunk
    txt = (kid − Ns) // n_pieces): txt, key positions c, their validity (in the segment), the keys a row may see
    (also valid in KVALID with HAS_KMASK) and the K, V tiles."""
    txt = (kid - Ns) // n_pieces
    if kid < Ns:
        start = tl.load(BSTART + b.to(tl.int64) * Ns + kid).to(tl.int64)
        length = tl.load(BLEN + b.to(tl.int64) * Ns + kid)
    else:
        start = tl.load(TXT + (b * n_txt + txt) * 2).to(tl.int64)
        length = tl.load(TXT + (b * n_txt + txt) * 2 + 1)
    c, key_ok, k, v = _segment_kv(K, V, b, hkv, start, length, Tk, skb, skh, skt, svb, svh, svt, BLOCK_N, D, DV)
    c_ok = key_ok
    if HAS_KMASK:
        c_ok = c_ok & (tl.load(KVALID + b.to(tl.int64) * Tk + c, mask=c_ok, other=0) != 0)
    return txt, c, key_ok, c_ok, k, v


@triton.jit
def _by_key_readers(LIST, NEED, i, e_hi, kid, bh, b, Tq, Ns, n_list, txt, G: tl.constexpr, ROWS: tl.constexpr,
                    NSEL: tl.constexpr, IDX64: tl.constexpr):
    """The rows r = position·G + head of one step of a by-key selection launch, from reader entry i on: each row's
    position t, slot (its top-n rank, NSEL for its own block, NSEL+1+txt for a text chunk) and validity, and the
    step's first position (the smallest: entries ascend by position). A selection block's readers are entries of
    LIST (t·(NSEL+1) + slot; `_selection_lists` leaves out positions that do not need the branch), a text chunk's
    the positions i … e_hi−1 that need it."""
    r = tl.arange(0, ROWS)
    e = i + r // G
    ok = (e < e_hi) & (r < ROWS // G * G)
    if kid < Ns:
        lst = LIST + (bh.to(tl.int64) if IDX64 else bh) * n_list
        f = tl.load(lst + e, mask=ok, other=0).to(tl.uint32, bitcast=True)
        t = (f // (NSEL + 1)).to(tl.int32, bitcast=True)  # unsigned: no sign fix-up after the multiply-high
        slot = (f % (NSEL + 1)).to(tl.int32, bitcast=True)
        t_first = (tl.load(lst + i).to(tl.uint32, bitcast=True) // (NSEL + 1)).to(tl.int32, bitcast=True)
    else:
        t = e
        slot = e * 0 + (NSEL + 1 + txt)
        ok = ok & (tl.load(NEED + b * Tq + t, mask=ok, other=0) != 0)
        t_first = i
    return t, slot, ok, t_first


@triton.jit
def _slot_index(bh, t, t0, P, slot, g, G: tl.constexpr, NSLOT: tl.constexpr, IDX64: tl.constexpr):
    """Index of the rows' per-segment partial at [bh, t − t0, slot, g]: int32 (fewer instructions) unless the
    launch's offsets reach 2³¹ (IDX64, `_indices_need_int64`)."""
    base = bh
    if IDX64:
        base = bh.to(tl.int64)
    return ((base * P + (t - t0)) * NSLOT + slot) * G + g


@triton.jit
def _step_masked(p_first, last, c_top, HAS_KMASK: tl.constexpr):
    """Whether a by-key step needs its [rows, keys] mask: not when the segment is full (``last`` = ``c_top``) and its
    first position ``p_first`` (the step's smallest) sees all of it, so every row sees every key (the selected
    blocks of positions past them: all steps but those of a block's own positions). Rows not read need no mask:
    the forward does not store them, and the backward's are zero (q, dO, gate 0, log-sum-exp +inf)."""
    if HAS_KMASK:
        return c_top >= 0
    return tl.minimum(p_first, last) < c_top


@triton.jit
def _selection_partials(Q, K, V, OP, LP, LIST, WALK, SEG, BSTART, BLEN, TXT, NEED, KVALID,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                        Tq, Tk, Ns, n_items, n_txt, n_pieces, n_list, t0, P, scale,
                        G: tl.constexpr, HKV: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                        D: tl.constexpr, DV: tl.constexpr, NSEL: tl.constexpr, NSLOT: tl.constexpr,
                        PRECISION: tl.constexpr, HAS_KMASK: tl.constexpr, IDX64: tl.constexpr):
    """The selection branch's forward by key segment (program kid, bh) for positions t0 … t0+P−1: the segment's
    K/V tile is loaded once and every (position, head) row that reads it gets the softmax of its scores over this
    segment alone, RT = ROWS // G positions per step (rows packed as position·G + head, not padded to a power of
    two: group 7 fills 63 of 64 rows, not 56): LP = its log-sum-exp (fp32; −inf when it sees no key), OP = the
    normalised output (OP's dtype), at [bh, t − t0, slot, g] with slot the segment's rank among the position's
    (``s`` < NSEL+1: its top-n ids and own block; NSEL+1+i: text chunk i). `_selection_combine` merges a position's
    slots. Readers: program j < n_items takes a piece of selection block kid = SEG[bh, j], entries WALK[bh, j] =
    (first, end) of LIST[bh], each t·(NSEL+1) + s (`_split_selection_walk`: a block many positions select is cut
    in pieces); program n_items + i·n_pieces + j takes piece j of text chunk i, the positions first … end−1."""
    item = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    walk = WALK + (bh.to(tl.int64) * (n_items + n_txt * n_pieces) + item) * 2
    e_lo = tl.load(walk)
    e_hi = tl.load(walk + 1)
    if e_lo >= e_hi:
        return
    if item < n_items:
        kid = tl.load(SEG + bh.to(tl.int64) * n_items + item)
    else:
        kid = Ns + (item - n_items)
    txt, c, key_ok, c_ok, k, v = _by_key_segment(K, V, BSTART, BLEN, TXT, KVALID, kid, b, hkv, Tk, Ns, n_txt,
                                                 n_pieces, skb, skh, skt, svb, svh, svt, BLOCK_N, D, DV, HAS_KMASK)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    RT: tl.constexpr = ROWS // G
    c32 = c.to(tl.int32)  # positions < 2³¹: int32 compares in the loop (one instruction each, not two)
    last = tl.max(tl.where(key_ok, c32, -1), axis=0)  # the segment's last key (its keys are c ≤ last)
    c_top = tl.max(c32, axis=0)  # = last when the segment is full
    r = tl.arange(0, ROWS)
    g = r % G
    h = hkv * G + g
    for i in range(e_lo, e_hi, RT):
        t, slot, ok, t_first = _by_key_readers(LIST, NEED, i, e_hi, kid, bh, b, Tq, Ns, n_list, txt, G, ROWS, NSEL,
                                               IDX64)
        bw = b.to(tl.int64) if IDX64 else b  # int32 offsets below 2³¹ elements: fewer instructions per row
        q_ptr = Q + bw * sqb + h * sqh + tl.where(ok, t, 0) * sqt  # rows not read: position 0, their scores unseen
        q = tl.load(q_ptr[:, None] + d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # unscaled: the scale (> 0) goes into one FFMA
        if _step_masked(Tk - Tq + t_first, last, c_top, HAS_KMASK):
            vis = c32[None, :] <= tl.where(ok, tl.minimum(Tk - Tq + t, last), -1)[:, None]  # causal, in the segment
            if HAS_KMASK:
                vis = vis & c_ok[None, :]
            s = tl.where(vis, s, float("-inf"))
        m = tl.max(s, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m) * (scale * LOG2E)  # log2 units
        ex = tl.math.exp2(s * (scale * LOG2E) - m_safe[:, None])
        l = tl.sum(ex, axis=1)
        l_safe = tl.where(l == 0.0, 1.0, l)
        # normalised before the product: [rows, 64] multiplies instead of [rows, DV]
        o = tl.dot((ex * (1.0 / l_safe)[:, None]).to(v.dtype), v, input_precision=PRECISION)
        idx = _slot_index(bh, t, t0, P, slot, g, G, NSLOT, IDX64)
        lse2 = m_safe + tl.math.log2(l_safe)
        tl.store(LP + idx, tl.where(l == 0.0, float("-inf"), lse2 * LN2), mask=ok)
        tl.store(OP + idx[:, None] * DV + dv[None, :], o.to(OP.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _combine_rows(NEED, Tq, t0, P, G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr,
                  NSLOT: tl.constexpr):
    """The rows r = t·GP + g of a combine program's tile of positions t0 + tile·BLOCK_T …: batch, KV head, head in
    the group, position, whether the row needs the branch, and the index of its slot 0 among the per-segment
    partials ([bh, t − t0, slot]; times G plus g for a row's)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    r = tl.arange(0, BLOCK_T * GP)
    g = r % GP
    t = t0 + tile * BLOCK_T + r // GP
    valid = (g < G) & (t < Tq) & (t < t0 + P)
    valid = valid & (tl.load(NEED + b * Tq + t, mask=valid, other=0) != 0)
    return b, hkv, g, t, valid, (bh.to(tl.int64) * P + (t - t0)) * NSLOT


@triton.jit
def _selection_combine(OP, LP, OUT, LSE, GATE, NEED, sob, soh, sot, Tq, t0, P, dv_out,
                       G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr,
                       DV: tl.constexpr, NSLOT: tl.constexpr, GI: tl.constexpr, OUT_IN: tl.constexpr):
    """The selection branch's output of a tile of positions t0 + tile·BLOCK_T …: the softmax over the union of its
    segments from the per-segment (log-sum-exp, output) pairs of `_selection_partials` (o = Σ_s e^{lse_s − lse}
    o_s, lse = log Σ_s e^{lse_s}), in slot order (deterministic); LSE[row] = lse (+inf for a row that sees
    nothing), and the gated output goes to OUT as in `_fwd`."""
    b, hkv, g, t, valid, base = _combine_rows(NEED, Tq, t0, P, G, GP, HKV, BLOCK_T, NSLOT)
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return
    dv = tl.arange(0, DV)
    m_i = tl.full([BLOCK_T * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], tl.float32)
    acc = tl.zeros([BLOCK_T * GP, DV], tl.float32)
    for s in range(0, NSLOT):
        idx = (base + s) * G + g
        lp = tl.load(LP + idx, mask=valid, other=float("-inf"))
        seen = lp != float("-inf")  # NaN (a NaN or inf input among the segment's scores) propagates, as in `_fwd`
        o = tl.load(OP + idx[:, None] * DV + dv[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
        m_i, l_i, acc = _merge_partial(m_i, l_i, acc, lp, o, seen)
    o, row = _merged_rows(m_i, l_i, acc, LSE, b, hkv, g, t, valid, Tq, G, HKV)
    gate = 1.0
    if GI >= 0:
        gate = tl.load(GATE + row * 3 + GI, mask=valid, other=0.0)
    _write_rows(o, gate, OUT, b, hkv, t, valid, sob, soh, sot, dv_out, G, GP, BLOCK_T, DV, GI, OUT_IN)



@triton.jit
def _selection_bwd_partials(Q, K, V, DO, GATE, LSE, DELTA, DQP, RDP, SEEN, DK, DV_, TDK, TDV, LIST, WALK, BSTART,
                            BLEN, TXT, NEED, KVALID, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                            Tq, Tk, Ns, n_txt, n_pieces, n_list, t0, P, scale,
                            G: tl.constexpr, HKV: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                            D: tl.constexpr, DV: tl.constexpr, NSEL: tl.constexpr, NSLOT: tl.constexpr,
                            PRECISION: tl.constexpr, HAS_KMASK: tl.constexpr, IDX64: tl.constexpr):
    """The selection branch's backward by key segment (program kid, bh) for positions t0 … t0+P−1, the readers of
    `_selection_partials`: the segment's K/V tile is loaded once, and each reading (position, head) row, with
    its softmax statistic LSE and DELTA = gate·Σ_d dO·o_slc (fp32 [B, Hq, Tq], known before: from the forward),
    gives P = exp(s − lse), dP = dO·v, dS = P (gate·dP − delta) (NSA eq. 5 through the softmax): at
    [bh, t − t0, slot, g] its dq over this segment (DQP, scale·dS·k, DQP's dtype), its Σ_j P_j dP_j (RDP, fp32:
    the gate gradient's share) and SEEN = 1; the segment's dk += scale·dSᵀq, dv += (gate·P)ᵀ dO are added to
    DK, DV (fp32 [B·Hkv, Tk, ·]; a selection block has one program per chunk of positions) or, for a piece of a
    text chunk, to its slice of TDK, TDV (as in `_bwd_dkdv`)."""
    kid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hkv = bh % HKV
    walk = WALK + (bh.to(tl.int64) * (Ns + n_txt * n_pieces) + kid) * 2
    e_lo = tl.load(walk)
    e_hi = tl.load(walk + 1)
    if e_lo >= e_hi:
        return
    txt, c, key_ok, c_ok, k, v = _by_key_segment(K, V, BSTART, BLEN, TXT, KVALID, kid, b, hkv, Tk, Ns, n_txt,
                                                 n_pieces, skb, skh, skt, svb, svh, svt, BLOCK_N, D, DV, HAS_KMASK)
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    RT: tl.constexpr = ROWS // G
    r = tl.arange(0, ROWS)
    g = r % G
    h = hkv * G + g
    c32 = c.to(tl.int32)  # positions < 2³¹: int32 compares in the loop (one instruction each, not two)
    last = tl.max(tl.where(key_ok, c32, -1), axis=0)  # the segment's last key (its keys are c ≤ last)
    c_top = tl.max(c32, axis=0)  # = last when the segment is full
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dvv = tl.zeros([BLOCK_N, DV], tl.float32)
    for i in range(e_lo, e_hi, RT):
        t, slot, ok, t_first = _by_key_readers(LIST, NEED, i, e_hi, kid, bh, b, Tq, Ns, n_list, txt, G, ROWS, NSEL,
                                               IDX64)
        bw = b.to(tl.int64) if IDX64 else b  # int32 offsets below 2³¹ elements: fewer instructions per row
        q = tl.load((Q + bw * sqb + h * sqh + t * sqt)[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        row = (bw * (HKV * G) + h) * Tq + t
        do = tl.load(DO + row[:, None] * DV + dv[None, :], mask=ok[:, None], other=0.0)
        lse = tl.load(LSE + row, mask=ok, other=float("inf"))
        delta = tl.load(DELTA + row, mask=ok, other=0.0)
        gate = tl.load(GATE + row * 3 + 1, mask=ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)  # log2 units
        pr = tl.math.exp2(s - (lse * LOG2E)[:, None])
        if _step_masked(Tk - Tq + t_first, last, c_top, HAS_KMASK):
            vis = c32[None, :] <= tl.where(ok, tl.minimum(Tk - Tq + t, last), -1)[:, None]  # causal, in the segment
            if HAS_KMASK:
                vis = vis & c_ok[None, :]
            pr = tl.where(vis, pr, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        idx = _slot_index(bh, t, t0, P, slot, g, G, NSLOT, IDX64)
        tl.store(RDP + idx, tl.sum(pr * dp, axis=1), mask=ok)
        ds = (pr * ((gate * scale)[:, None] * dp - (delta * scale)[:, None])).to(k.dtype)  # scale·dS
        dvv += tl.dot(tl.trans((pr * gate[:, None]).to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        dq = tl.dot(ds, k, input_precision=PRECISION)
        tl.store(SEEN + idx, tl.full([ROWS], 1, tl.int8), mask=ok)
        tl.store(DQP + idx[:, None] * D + d[None, :], dq.to(DQP.dtype.element_ty), mask=ok[:, None])
    pk = DK + (bh.to(tl.int64) * Tk + c)[:, None] * D + d[None, :]
    pv = DV_ + (bh.to(tl.int64) * Tk + c)[:, None] * DV + dv[None, :]
    if kid >= Ns:  # a piece of a text chunk's readers: its own slice of TDK, TDV
        tp = (bh.to(tl.int64) * (tl.num_programs(0) - Ns) + kid - Ns) * BLOCK_N + tl.arange(0, BLOCK_N)
        pk = TDK + tp[:, None] * D + d[None, :]
        pv = TDV + tp[:, None] * DV + dv[None, :]
    tl.store(pk, tl.load(pk, mask=key_ok[:, None], other=0.0) + dk, mask=key_ok[:, None])
    tl.store(pv, tl.load(pv, mask=key_ok[:, None], other=0.0) + dvv, mask=key_ok[:, None])


@triton.jit
def _selection_bwd_combine(DQP, RDP, SEEN, DQ, RD, NEED, Tq, t0, P, G: tl.constexpr, GP: tl.constexpr,
                           HKV: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, NSLOT: tl.constexpr):
    """Rows of a tile of positions t0 + tile·BLOCK_T …: DQ[row] += the sum of its segments' dq (DQP) and RD[row] =
    the sum of their Σ_j P_j dP_j (RDP), over the slots `_selection_bwd_partials` wrote (SEEN), in slot order
    (deterministic)."""
    b, hkv, g, t, valid, base = _combine_rows(NEED, Tq, t0, P, G, GP, HKV, BLOCK_T, NSLOT)
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return
    d = tl.arange(0, D)
    dq = tl.zeros([BLOCK_T * GP, D], tl.float32)
    rd = tl.zeros([BLOCK_T * GP], tl.float32)
    for s in range(0, NSLOT):
        idx = (base + s) * G + g
        seen = valid & (tl.load(SEEN + idx, mask=valid, other=0) != 0)
        rd += tl.load(RDP + idx, mask=seen, other=0.0)
        dq += tl.load(DQP + idx[:, None] * D + d[None, :], mask=seen[:, None], other=0.0).to(tl.float32)
    row = (b.to(tl.int64) * (HKV * G) + hkv * G + g) * Tq + t
    tl.store(RD + row, rd, mask=valid)
    dq_ptr = DQ + row[:, None] * D + d[None, :]
    tl.store(dq_ptr, tl.load(dq_ptr, mask=valid[:, None], other=0.0) + dq, mask=valid[:, None])


@triton.jit
def _row_dot(A, B_, OUT, n_rows, W, sa, sb, ROWS: tl.constexpr, WP: tl.constexpr):
    """OUT[r] = Σ_{j < W} A[r·sa + j]·B_[r·sb + j] in fp32 for ``ROWS`` rows per program."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, WP)
    m = (r < n_rows)[:, None] & (j < W)[None, :]
    a = tl.load(A + r[:, None] * sa + j[None, :], mask=m, other=0.0).to(tl.float32)
    b = tl.load(B_ + r[:, None] * sb + j[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + r, tl.sum(a * b, axis=1), mask=r < n_rows)


# -------------------------------------------------------------------------------------------------- host side
def _geometry(Hq: int, Hkv: int, dtype: torch.dtype = torch.bfloat16, mode: int = DENSE, halve: bool = False):
    """(G, G rounded up to a power of two, positions per tile). Contiguous-key modes take 128 rows per tile (64 in
    fp32, for shared memory; half that with ``halve``, which the top-n kernel asks for above head dim 128 and the
    compression branch for its backward's pass, and for its dk/dv with groups above 8); the selection mode takes
    16 rows, as few positions as ``tl.dot`` allows, because every position reads its own blocks."""
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    rows = 16 if mode == SELECTION else (64 if dtype == torch.float32 else 128) // (2 if halve else 1)
    return G, GP, max(1, rows // GP)


def tile_positions(Hq: int, Hkv: int, dtype: torch.dtype, mode: int) -> int:
    """Positions per query tile of a forward launch in ``mode`` (`SegmentPlan.tiles` counts in these tiles)."""
    return _geometry(Hq, Hkv, dtype, mode)[2]


class TopnGeometry(NamedTuple):
    """What `select_topn` needs of the layout, the same for every head and layer of a call: int32 [B, Ns] first
    compression block overlapping each selection block and their count, the largest count ``W`` (a host value),
    int32 [B, Tq] the candidates of each query (the blocks ending before its own block), and ``identity`` (a host
    value): every selection block a video position may select is the compression block of the same index, alone
    (compression and selection blocks coincide: the ``videonsa`` preset on one video span, or on several of whole
    blocks)."""

    first: torch.Tensor
    width: torch.Tensor
    W: int
    ncand: torch.Tensor
    identity: bool


@dataclass
class SegmentPlan:
    """What a launch needs besides q, k, v: the mode, the rows that need it and the mode's tables.

    Attributes:
        mode: DENSE, WINDOW, COMPRESSED or SELECTION; need: int8 [B, Tq], rows whose output this branch gives;
        tk: number of key positions Tk (the queries are the last Tq of them); gate: index of the branch's gate in
        the [B, Hq, Tq, 3] gates (compression 0, selection 1, window 2), −1 for none (dense);
        window: w (WINDOW); kend: int32 [B, Nk] last key position of each compressed key (COMPRESSED);
        selected: int32 [B, Hkv, Tq, n] top-n block ids (−1: none) and segments: int32 [B, Hkv, Tq, n+1, 2] the
        (start, length) of those blocks and of the position's own block (length 0: none), both from `select_topn`;
        own: int32 [B, Tk] own selection block of each position (−2 for text); block_start / block_len: int32
        [B, Ns] selection blocks; text: int32 [B, n_txt, 2] (start, length) chunks of at most ``block_n`` text keys
        (SELECTION); key_valid: int8 [B, Tk], the keys an attention mask leaves visible (its key padding; None:
        all), for every mode but COMPRESSED; topn: the call's `TopnGeometry` (SELECTION), shared by its
        `select_topn` launches (one per chunk of KV heads); tiles: int32 [n] the query tiles with rows that need
        the branch and tiles_walk the most key segments one of them visits (DENSE: the forward may then split
        their keys over several programs, `dense_splits`).
    """

    mode: int
    need: torch.Tensor
    tk: int
    gate: int = -1
    window: int = 1
    kend: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    own: torch.Tensor | None = None
    block_start: torch.Tensor | None = None
    block_len: torch.Tensor | None = None
    text: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    block_n: int = 64
    topn: TopnGeometry | None = None
    tiles: torch.Tensor | None = None
    tiles_walk: int = 0

    def tables(self, device):
        """The kernels' table arguments by name (a 1-element dummy for each table the mode lacks), Ns, n_txt and
        n."""
        z = torch.zeros(1, dtype=torch.int32, device=device)
        pick = lambda x: z if x is None else x  # noqa: E731
        n_txt = 0 if self.text is None else self.text.shape[1]
        Ns = 0 if self.block_start is None else self.block_start.shape[1]
        nsel = 1 if self.selected is None else self.selected.shape[-1]
        names = ("kend", "text", "segments", "block_start", "block_len", "need", "key_valid")
        return {name: pick(getattr(self, name)) for name in names}, Ns, n_txt, nsel


def _launch_common(q, k, v, plan: SegmentPlan, by_position: bool = False, halve: bool = False):
    """Tables, strides, sizes, constexprs and query-tile grid of a `_fwd` launch, or (``by_position``) of a
    `_bwd_dkdv` launch, whose selection tiles are single positions; ``halve``: half the rows per tile."""
    B, Hq, Tq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, GP, BLOCK_T = _geometry(Hq, Hkv, q.dtype, plan.mode, halve=halve)
    if by_position and plan.mode == SELECTION:
        BLOCK_T = 1
    tables, Ns, n_txt, nsel = plan.tables(q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    meta = dict(G=G, GP=GP, HKV=Hkv, BLOCK_T=BLOCK_T, BLOCK_N=plan.block_n, D=D, DV=Dv, GI=plan.gate,
                MODE=plan.mode, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                HAS_KMASK=plan.key_valid is not None and plan.mode != COMPRESSED)
    if not by_position:
        meta["NSEL"] = nsel
    return tables, strides, (Tq, plan.tk, Nk, Ns, n_txt), meta, (triton.cdiv(Tq, BLOCK_T), B * Hkv)


def _launch_options(q, plan: SegmentPlan, bwd: bool, gp: int) -> dict:
    """Measured on an H100 at 128K (BENCHMARKS.md, eighth and ninth sessions): selection tiles (16 rows reading
    data-dependent blocks) gain most from two-stage pipelining of their K/V loads, with 4 warps in the forward and 2
    in the backward's pass (which keeps more registers per row). That pass keeps two fp32 [rows, D] sums: 8 warps for
    the 128-row tiles of the other modes, as for the window's forward (its band is short: 1.4 against 2.5 ms per KV
    head with 4 warps), and two stages in half precision up to head dim 128 (compression, tenth session: 7.4
    against 8.2 ms per KV head for shape B, 4.0 against 4.2 for A). The compression branch's pass takes half the
    rows (`segment_attention_fwd`) on 4 warps (fourteenth session, all 4 KV heads at 128K: B 27.1 against 30.2 ms,
    A 14.1 against 15.9)."""
    if plan.mode == SELECTION:
        return dict(num_warps=2 if bwd else 4, num_stages=2)
    deep = q.dtype != torch.float32 and q.shape[-1] <= 128  # K/V tiles small enough for more pipeline stages
    if bwd:
        return dict(num_warps=4 if plan.mode == COMPRESSED else 8, num_stages=2 if deep else 1)
    if plan.mode == COMPRESSED and gp >= 16 and deep:
        return dict(num_warps=8, num_stages=3)  # 16-head groups (shape B): 4.8 against 5.2 ms per KV head
    return dict(num_warps=8 if plan.mode == WINDOW else 4, num_stages=1 if q.dtype == torch.float32 else 2)


def segment_attention_fwd(q, k, v, scale: float, plan: SegmentPlan, gates, out=None, first: bool = False,
                          grad_out=None, dq=None, lse=None):
    """One branch's forward, or the backward's pass over the same keys.

    Args:
        q [B, Hq, Tq, D]; k [B, Hkv, Nk, D]; v [B, Hkv, Nk, Dv] (Nk = Tk, or the compressed count in COMPRESSED
        mode), fp16 / bf16 / fp32; gates: fp32 contiguous [B, Hq, Tq, 3];
        out: (forward) [B, Hq, Tq, Dv'] (Dv' ≤ Dv, last stride 1): the needed rows get ``+= gate·o`` (or ``+= o``
        without a gate) in out's dtype; ``first``: they get ``= gate·o`` (the first branch of those rows: ``out``
        needs no zeroing);
        grad_out, dq: (the backward's pass) contiguous [B, Hq, Tq, Dv] dO and fp32 contiguous [B, Hq, Tq, D]: the
        needed rows of ``dq`` get ``+=`` the branch's dq (see `_fwd`; ``= dq`` with ``first``: the first pass over
        those rows, so ``dq`` needs no zeroing), and their ``Σ_d dO·o`` is returned;
        lse: with grad_out, the forward's log-sum-exp of the branch (fp32 contiguous [B, Hq, Tq]; its rows that
        need the branch are read): the pass takes P from it, with no running maximum to rescale by.
    Returns:
        (lse fp32 [B, Hq, Tq] (the one given, if any), rowdot fp32 [B, Hq, Tq] or None); rows not needed hold NaN
        (the given lse: what it held).
    """
    bwd = grad_out is not None
    lse_in = bwd and lse is not None
    tables, strides, sizes, meta, grid = _launch_common(q, k, v, plan, halve=bwd and plan.mode == COMPRESSED)
    B, Hq, Tq = q.shape[:3]
    if not lse_in:
        lse = torch.full((B, Hq, Tq), float("nan"), dtype=torch.float32, device=q.device)
    rowd = torch.full((B, Hq, Tq), float("nan"), dtype=torch.float32, device=q.device) if bwd else None
    z = torch.zeros(1, dtype=torch.float32, device=q.device)
    cmp_n = z
    if plan.mode == COMPRESSED:  # causality: a tile visits only the compressed keys its last position sees
        last = (torch.arange(1, grid[0] + 1, device=q.device, dtype=torch.int32) * meta["BLOCK_T"]).clamp(max=Tq)
        last = (last + (plan.tk - Tq - 1)).expand(B, grid[0]).contiguous()
        cmp_n = torch.searchsorted(plan.kend, last, right=True).to(torch.int32)
    rows = meta["BLOCK_T"] * meta["GP"]
    split, seg_per = (0, 0) if bwd or plan.tiles is None else dense_splits(
        plan.tiles.numel() * grid[1], plan.tiles_walk, rows * (v.shape[-1] + 1) * 4, q.device)
    if split > 1:  # few long programs (a prompt after a long video): each tile's keys in `split` shares
        grid = (plan.tiles.numel(), grid[1], split)
        pl = torch.empty(split * grid[0] * grid[1] * rows, dtype=torch.float32, device=q.device)
        po = torch.empty(pl.numel() * v.shape[-1], dtype=torch.float32, device=q.device)
    tiles, po, pl = (plan.tiles, po, pl) if split > 1 else (z, z, z)
    _fwd[grid](q, k, v, z if bwd else out, lse, rowd if bwd else z,
               grad_out if bwd else z, dq if bwd else z, gates, tables["kend"], cmp_n, tables["text"],
               tables["segments"], tables["need"], tables["key_valid"], tiles, po, pl, *strides,
               *((0, 0, 0) if bwd else out.stride()[:3]), *sizes, plan.window, scale, 0 if bwd else out.shape[-1],
               seg_per, **meta, BWD=bwd, OUT_IN=not first, LSE_IN=lse_in, SPLIT=split > 1,
               **_launch_options(q, plan, bwd, meta["GP"]))
    if split > 1:
        _merge_splits[grid[:2]](po, pl, out, lse, tiles, tables["need"], *out.stride()[:3], Tq, split, out.shape[-1],
                                G=meta["G"], GP=meta["GP"], HKV=meta["HKV"], BLOCK_T=meta["BLOCK_T"],
                                DV=meta["DV"], OUT_IN=not first, num_warps=4)
    return lse, rowd


# The dense branch's forward (text rows) splits each tile's keys over several programs when its programs are few
# and long: a prompt after a long video. Shape A at 128K with 16 text tokens before the video and 48 after: 12
# programs of 2,048 segments took ~8.6 ms on the side stream, and the forward 61.4 ms; split, `_fwd`'s kernel time
# went 18.1 → 9.8 ms and the forward to 61.1–61.2 (65.4 against 66.2 with a 512-token prompt; H100, BENCHMARKS.md
# twenty-fourth session). Each share walks at least this many segments; the launch aims at two programs per SM,
# with at most DENSE_SPLIT_BYTES of fp32 partial outputs (`nsa_triton.memory_estimate` counts them).
DENSE_SPLIT_MIN_SEGMENTS = 64
DENSE_SPLIT_BYTES = 32 << 20


def dense_splits(programs: int, n_seg: int, share_bytes: int, device: torch.device) -> tuple[int, int]:
    """(shares S, segments per share) of the dense branch's split forward for ``programs`` (tile, batch × KV head)
    programs walking up to ``n_seg`` key segments, each share's partial output taking ``share_bytes``; (0, 0) when
    splitting does not pay (S < 2)."""
    programs = max(1, programs)
    split = min(triton.cdiv(n_seg, DENSE_SPLIT_MIN_SEGMENTS), triton.cdiv(2 * sm_count(device), programs),
                DENSE_SPLIT_BYTES // (programs * share_bytes))
    if split < 2:
        return 0, 0
    seg_per = triton.cdiv(n_seg, split)
    return triton.cdiv(n_seg, seg_per), seg_per


def segment_attention_bwd(q, k, v, grad_out, gates, lse, delta, scale: float, plan: SegmentPlan, dk, dv):
    """dk, dv of one branch (its dq comes with the backward's pass, `segment_attention_fwd` with ``grad_out``),
    accumulated in place: ``dk`` fp32 [B, Hkv, Nk, D], ``dv`` fp32 [B, Hkv, Nk, Dv] (contiguous) get the gradients
    of ``Σ gate·o``. ``lse`` from that pass and ``delta`` = ``Σ_d (gate·dO)·o`` per row (fp32 [B, Hq, Tq]);
    ``grad_out`` contiguous [B, Hq, Tq, Dv]."""
    wide = plan.mode == COMPRESSED and q.shape[1] // k.shape[1] > 8  # see DKDV_LAUNCH_WIDE_GROUP
    tables, strides, sizes, meta, grid = _launch_common(q, k, v, plan, by_position=True, halve=wide)
    B, Hq, Tq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    n_tiles = grid[0]
    splits = 1
    configs = (DKDV_LAUNCH_WIDE_GROUP if wide else DKDV_LAUNCH,)
    n_pieces = 1
    tdk = tdv = torch.zeros(1, dtype=torch.float32, device=q.device)
    if plan.mode == SELECTION:
        n_txt = plan.text.shape[1]
        per_piece = B * Hkv * n_txt * plan.block_n * (D + v.shape[-1]) * 4
        piece = triton.cdiv(Tq, max(1, min(triton.cdiv(Tq, SELECTION_TEXT_PIECE),
                                           SELECTION_TEXT_PARTIAL_BYTES // max(1, per_piece))))
        n_pieces = triton.cdiv(Tq, piece)
        pos, walk = _selection_walk(plan, Tq, Hkv, piece)
        n_keys = walk.shape[1]
        if n_txt:
            tdk = torch.zeros(B * Hkv, n_txt * n_pieces, plan.block_n, D, dtype=torch.float32, device=q.device)
            tdv = torch.zeros(B * Hkv, n_txt * n_pieces, plan.block_n, v.shape[-1], dtype=torch.float32,
                              device=q.device)
        shape = (q.dtype, D, v.shape[-1], plan.block_n, meta["GP"])
        configs = tuple((max(1, rows // meta["GP"]), opts) for rows, opts in SELECTION_DKDV_CONFIGS)
        configs = configs[_dkdv_config.get(shape, 0):]
    else:
        pos = walk = torch.zeros(1, dtype=torch.int32, device=q.device)
        n_keys = triton.cdiv(Nk, meta["BLOCK_N"])
        if plan.mode == DENSE:
            pos, walk = _dense_walk(plan.need, plan.tk, meta["BLOCK_T"], plan.block_n, n_keys, Hkv)
        if plan.mode == COMPRESSED:
            splits = compressed_dkdv_splits(n_tiles, B * Hkv * Nk * (D + v.shape[-1]) * 4)
    split = triton.cdiv(n_tiles, splits)
    dk_, dv_ = dk, dv
    if splits > 1:
        dk_, dv_ = dk.new_empty(splits, *dk.shape), dv.new_empty(splits, *dv.shape)
    for i, (rt, options) in enumerate(configs):
        try:
            _bwd_dkdv[(n_keys, B * Hkv, splits)](q, k, v, grad_out, gates, lse, delta, dk_, dv_, tables["kend"],
                                                 tables["text"], tables["block_start"], tables["block_len"],
                                                 tables["need"], tables["key_valid"], walk, pos, tdk, tdv, *strides,
                                                 *sizes, n_pieces, n_tiles, pos.shape[-1],
                                                 plan.window, scale, split, **meta, RT=rt, SPLIT=splits > 1,
                                                 **options)
        except OutOfResources:  # raised before the launch: nothing was written; the next configuration is smaller
            if i + 1 == len(configs):
                raise
            continue
        if plan.mode == SELECTION and i:
            _dkdv_config[shape] = _dkdv_config.get(shape, 0) + i
        break
    if splits > 1:  # a fixed-order sum: deterministic
        dk += dk_.sum(0)
        dv += dv_.sum(0)
    if tdk.dim() > 1:
        _add_text_partials(dk, dv, tdk, tdv, plan.text, n_pieces)


def _add_text_partials(dk, dv, tdk, tdv, text, n_pieces: int) -> None:
    """dk, dv [B, Hkv, Tk, ·] += the selection branch's gradient of its text keys: the partial sums of each text
    chunk's pieces (tdk, tdv [B·Hkv, n_txt·n_pieces, BLOCK_N, ·] from `_bwd_dkdv`) summed in a fixed order and added
    at the chunk's keys (text int32 [B, n_txt, 2] = (start, length); chunks do not overlap, so every key gets one
    sum)."""
    B, Hkv = dk.shape[:2]
    n_txt, block_n = text.shape[1], tdk.shape[2]
    n = torch.arange(block_n, device=dk.device)
    bi, ti, ni = (n[None, None, :] < text[..., 1:2]).nonzero(as_tuple=True)
    keys = text[bi, ti, 0].long() + ni
    for grad, part in ((dk, tdk), (dv, tdv)):
        s = part.view(B, Hkv, n_txt, n_pieces, block_n, part.shape[-1]).sum(3)
        grad[bi, :, keys] += s[bi, :, ti, ni]


def _dense_walk(need, Tk: int, BLOCK_T: int, BLOCK_N: int, n_keys: int, Hkv: int):
    """What the DENSE mode's dk/dv walks (its rows are text queries, often a few among a long video): pos int32
    [B·Hkv, tiles] the query tiles of ``BLOCK_T`` positions holding needed rows, ascending (then the tile count as
    padding), and walk int32 [B·Hkv, n_keys, 2] per key block of ``BLOCK_N`` keys the (first, end) entries of pos
    from the first tile that can see it (walking every later tile instead took ~0.25 s per backward at 128K with a
    prompt around the video; H100, BENCHMARKS.md thirteenth session)."""
    B, Tq = need.shape
    n_tiles = triton.cdiv(Tq, BLOCK_T)
    has = torch.nn.functional.pad(need.bool(), (0, n_tiles * BLOCK_T - Tq)).view(B, n_tiles, BLOCK_T).any(-1)
    idx = torch.arange(n_tiles, device=need.device)
    tiles = torch.where(has, idx, n_tiles).sort(-1).values.contiguous()
    first = ((torch.arange(n_keys, device=need.device) * BLOCK_N - (Tk - Tq)).clamp_min(0) // BLOCK_T)
    lo = torch.searchsorted(tiles, first.expand(B, n_keys).contiguous())
    walk = torch.stack([lo, has.sum(-1, keepdim=True).expand(B, n_keys)], -1)
    return (tiles.repeat_interleave(Hkv, 0).to(torch.int32).contiguous(),
            walk.repeat_interleave(Hkv, 0).to(torch.int32).contiguous())


# Selection dk/dv, fastest first: rows per step of a block's walk over the positions that read it (several
# positions per step, so each round trip to memory carries more work) and launch options. Measured on an H100 at
# 128K (BENCHMARKS.md, ninth session): 128 rows, 8 warps, 2 stages 17.9 ms per KV head against 39.3 for 64 rows,
# 4 warps, 1 stage. Large head dims and selection blocks do not fit 128 rows in shared memory (bf16, head dim 256,
# blocks of 128: 288 KiB, the H100 has 227): the first configuration that fits is used, and remembered per shape
# (dtype, head dims, block, group) in _dkdv_config.
SELECTION_DKDV_CONFIGS = ((128, dict(num_warps=8, num_stages=2)), (64, dict(num_warps=4, num_stages=1)),
                          (32, dict(num_warps=4, num_stages=1)), (16, dict(num_warps=4, num_stages=1)))
_dkdv_config: dict = {}
# (RT, launch options) of the dk/dv launch of the other modes than selection: 8 warps (compression dk/dv at 128K,
# H100, tenth session: 13.0 against 14.9 ms per KV head for shape B, 6.3 against 8.2 for A). Compression with a
# group above 8 (shape B's 16 heads): 64 rows (`_launch_common`) on 4 warps, 47.5 against 51.4 ms for the 4 KV
# heads at 128K; for A, 128 rows on 8 warps stays best (27.5 ms; 64 rows: 52.7; BENCHMARKS.md, fourteenth session).
DKDV_LAUNCH = (1, dict(num_warps=8, num_stages=1))
DKDV_LAUNCH_WIDE_GROUP = (1, dict(num_warps=4, num_stages=1))
# Selection dk/dv of text keys: every video position after a text chunk reads it, so its walk is cut in pieces of
# at least this many positions, each with its own partial dk/dv (at most this many bytes for all of them).
SELECTION_TEXT_PIECE = 1024
SELECTION_TEXT_PARTIAL_BYTES = 64 << 20
# Compression dk/dv: the few compressed keys are each read by every later query, so one program per key block
# would walk up to all query tiles alone (the backward's long pole at long context); the walk is split in chunks of
# at least this many tiles, with at most COMPRESSED_SPLIT_BYTES of fp32 partial sums.
COMPRESSED_SPLIT_TILES = 64
COMPRESSED_SPLIT_BYTES = 256 << 20


def compressed_dkdv_splits(n_tiles: int, bytes_per_split: int) -> int:
    """Chunks the compression branch's dk/dv walk over ``n_tiles`` query tiles is split in (1: no split), given
    the fp32 bytes of one chunk's partial dk and dv."""
    cap = max(1, COMPRESSED_SPLIT_BYTES // bytes_per_split)
    splits = max(1, min(triton.cdiv(n_tiles, COMPRESSED_SPLIT_TILES), cap))
    return triton.cdiv(n_tiles, triton.cdiv(n_tiles, splits))


def _selection_lists(plan: SegmentPlan, Tq: int, Hkv: int, chunk: int, text_piece: int | None = None):
    """Who reads each key segment of the selection branch, per chunk of ``chunk`` positions: per (batch, KV head)
    the entries t·(n+1) + s of every position t that selected (slot s < n) or owns (slot n) a selection block,
    grouped by chunk, then block, positions ascending (CSR: int32 [B·Hkv, Tq·(n+1)], unused entries at the end),
    and walk int32 [chunks, B·Hkv, Ns + n_txt·pieces, 2] = (first, end) per chunk and segment: entries first …
    end−1 of the list for a selection block, positions first … end−1 for text chunk i (segments Ns + i·pieces …:
    every position of the chunk from the text chunk's first key on, cut in ``pieces`` = ⌈chunk / text_piece⌉ runs
    of at most ``text_piece`` positions; one run without ``text_piece``). A position's block ids are distinct, so
    no (block, position) pair is listed twice. One stable sort for all chunks."""
    B, Tk, Ns = plan.need.shape[0], plan.tk, plan.block_start.shape[1]
    dev = plan.need.device
    own = plan.own[:, Tk - Tq:]
    ids = torch.cat([plan.selected, own[:, None, :, None].expand(B, Hkv, Tq, 1)], -1)  # [B, Hkv, Tq, n+1]
    n_chunks = triton.cdiv(Tq, chunk)
    ids = torch.where((ids >= 0) & plan.need.bool()[:, None, :, None], ids, Ns)
    key_dtype = torch.int32 if n_chunks * (Ns + 1) < 2**31 else torch.int64
    chunk_of = (torch.arange(Tq, device=dev) // chunk).to(key_dtype)[None, None, :, None] * (Ns + 1)
    key, order = (ids.to(key_dtype) + chunk_of).reshape(B * Hkv, -1).sort(dim=-1, stable=True)
    edges = torch.arange(n_chunks * (Ns + 1), device=dev, dtype=key_dtype).expand(B * Hkv, -1).contiguous()
    bounds = torch.searchsorted(key, edges).reshape(B * Hkv, n_chunks, Ns + 1)
    lo, hi = bounds[..., :-1], bounds[..., 1:]
    if plan.text is not None and plan.text.shape[1]:
        t_lo = (plan.text[..., 0].long() - (Tk - Tq)).clamp(0, Tq)
        t_hi = torch.where(plan.text[..., 1] > 0, Tq, t_lo)
        piece = chunk if text_piece is None else text_piece
        # run j of chunk c: positions c·chunk + j·piece … (at most piece, within the chunk); [1, chunks, 1, runs]
        runs = triton.cdiv(chunk, piece)
        r0 = torch.arange(n_chunks, device=dev)[:, None] * chunk + torch.arange(runs, device=dev)[None, :] * piece
        r0, r1 = r0[None, :, None, :], torch.minimum(r0 + piece, (r0 // chunk + 1) * chunk)[None, :, None, :]
        t_lo, t_hi = (x.repeat_interleave(Hkv, 0)[:, None, :, None] for x in (t_lo, t_hi))  # [B·Hkv, 1, n_txt, 1]
        lo = torch.cat([lo, torch.minimum(torch.maximum(t_lo, r0), r1).flatten(2)], -1)
        hi = torch.cat([hi, torch.minimum(torch.maximum(t_hi, r0), r1).flatten(2)], -1)
    walk = torch.stack([lo, hi], -1).transpose(0, 1).to(torch.int32).contiguous()
    return order.to(torch.int32), walk


@triton.jit
def _split_walk(WALK, OUT, SEG, Ns, n_items, n_other, piece, BLOCK: tl.constexpr, CH: tl.constexpr):
    """`_split_selection_walk` for one (chunk, batch · KV head) row of the walk (program id)."""
    row = tl.program_id(0).to(tl.int64)
    src = WALK + row * (Ns + n_other) * 2
    dst = OUT + row * (n_items + n_other) * 2
    seg = SEG + row * n_items
    s = tl.arange(0, BLOCK)
    ok = s < Ns
    lo = tl.load(src + s * 2, mask=ok, other=0)
    hi = tl.load(src + s * 2 + 1, mask=ok, other=0)
    pieces = (hi - lo + piece - 1) // piece  # 0 for a block no position reads
    end = tl.cumsum(pieces, axis=0)
    first = end - pieces  # the block's first item
    for j in range(0, tl.max(pieces, axis=0)):
        m = j < pieces
        f = lo + j * piece
        tl.store(dst + (first + j) * 2, f, mask=m)
        tl.store(dst + (first + j) * 2 + 1, tl.minimum(f + piece, hi), mask=m)
        tl.store(seg + first + j, s, mask=m)
    c = tl.arange(0, CH)
    for i0 in range(tl.max(end, axis=0), n_items, CH):  # items past the pieces: empty
        i = i0 + c
        m = i < n_items
        tl.store(dst + i * 2, tl.zeros([CH], tl.int32), mask=m)
        tl.store(dst + i * 2 + 1, tl.zeros([CH], tl.int32), mask=m)
        tl.store(seg + i, tl.zeros([CH], tl.int32), mask=m)
    for i0 in range(0, n_other, CH):  # the text segments as they were
        i = i0 + c
        m = i < n_other
        tl.store(dst + (n_items + i) * 2, tl.load(src + (Ns + i) * 2, mask=m), mask=m)
        tl.store(dst + (n_items + i) * 2 + 1, tl.load(src + (Ns + i) * 2 + 1, mask=m), mask=m)


def _split_selection_walk(walk: torch.Tensor, Ns: int, piece: int, max_entries: int):
    """The selection blocks of ``walk`` (int32 [chunks, B·Hkv, Ns + text segments, 2] from `_selection_lists`)
    cut in pieces of at most ``piece`` reader entries, one program each, so that a block most positions of a
    chunk select does not hold its launch up while the other programs are done (the first blocks of a video, in
    the deeper layers of even a randomly initialised 7B model: ~2,400 of a chunk's ~2,800 positions, against ~160
    on average; twenty-third session). ``max_entries`` bounds a chunk's entries per (batch, KV head), so that the
    item count n_items = Ns + ⌈max_entries / piece⌉ ≥ Σ ⌈entries of a block / piece⌉ is known without a host sync.
    One launch (`_split_walk`): as ~25 PyTorch ops its host time slowed the 8K forward by ~0.7 ms.

    Returns: (walk int32 [chunks, B·Hkv, n_items + text segments, 2]: each chunk's pieces in block order, then
    empty ones, then the text segments as they were; seg int32 [chunks, B·Hkv, n_items]: the block of each
    piece, 0 for the empty ones; n_items)."""
    C, BH, width = walk.shape[:3]
    n_items = Ns + triton.cdiv(max_entries, piece)
    out = torch.empty(C, BH, n_items + width - Ns, 2, dtype=torch.int32, device=walk.device)
    seg = torch.empty(C, BH, n_items, dtype=torch.int32, device=walk.device)
    block = triton.next_power_of_2(Ns)
    _split_walk[(C * BH,)](walk.contiguous(), out, seg, Ns, n_items, width - Ns, piece, BLOCK=block, CH=256,
                           num_warps=4 if block <= 1024 else 8)
    return out, seg, n_items


def _selection_walk(plan: SegmentPlan, Tq: int, Hkv: int, text_piece: int):
    """`_selection_lists` in one chunk, as `_bwd_dkdv` reads it: pos int32 [B·Hkv, Tq·(n+1)], the positions that
    selected or own each selection block, and walk int32 [B·Hkv, Ns + n_txt·pieces, 2] (each text chunk's readers
    in runs of ``text_piece`` positions)."""
    entries, walk = _selection_lists(plan, Tq, Hkv, Tq, text_piece=text_piece)
    return (entries // (plan.selected.shape[-1] + 1)).contiguous(), walk[0]


# The selection forward by key segment (`selection_fwd`) keeps one (log-sum-exp, output) pair per position, head
# and segment for a chunk of positions at a time: as many positions as fit in this many bytes. Longer chunks give
# each program more readers of its block per launch (H100, shape A at 128K, forward: 640 MiB 69.2 ms against 71.5-72
# with 256 MiB, twentieth session); the forward's peak there is the output, these partials and ~60 MiB of tables
# (1591 MiB, against dense attention's 896 plus the output's 896).
SELECTION_PARTIAL_BYTES = 640 << 20
# At most this many steps of `_selection_partials` per program: a selection block read by more positions of a
# chunk is cut in pieces (`_split_selection_walk`). H100, shape A forward, outputs bitwise equal (twenty-third
# session): random inputs 16K 6.23 → 5.69 ms, 32K 13.69 → 12.23, 128K 64.7 → 59.1; the 7B end to end's layers
# at 128K 74–79 → 63 ms (16: the same within 1 %; 64: +1 to +1.5 ms; 8: +1 ms). The backward cut the same way
# (its later pieces' dk/dv kept apart and added after the launch) measured the same as whole blocks, on random
# and on the 7B's inputs (170 / 178 ms at 128K either way), so it walks whole blocks.
SELECTION_PIECE_STEPS = 32
# The by-key kernels index in int32 (fewer instructions per step: 1075 → 1017 per warp in the forward's loop,
# 1266 → 1186 in the backward's, offline sm_90 count) while every offset they compute into their partials,
# queries, dO, gates and reader lists stays below this; in int64 from it on (`_indices_need_int64`).
BY_KEY_INT32_MAX = 2**31


def _indices_need_int64(*tensors) -> bool:
    """Whether any element offset into ``tensors`` (the last element's, from sizes and strides) reaches
    `BY_KEY_INT32_MAX`, so that the by-key kernels must index in int64 (their IDX64)."""
    span = max((1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) if t.numel() else 0 for t in tensors)
    return span >= BY_KEY_INT32_MAX

# `_selection_partials`, fastest first: rows (positions × the group, packed) per step, launch options (half
# precision starts at the first, fp32 at the second). The first that fits in shared memory is used, and remembered
# per shape (dtype, head dims, block, group) in _fwd_config. 64 rows on 4 warps, 2 stages, replaced 128 rows on 8
# warps once the step had fewer instructions (H100, 128K, forward: A 75.6 / 75.9 → 73.2 / 73.2 ms, A with text
# around the video 79.1 / 77.8 → 75.6 / 76.0; B and 32K within noise; eighteenth session). Half precision at head
# dim 256 with blocks of 128 needs 192 KiB there (`scripts/check_kernels_sm90.py` with Triton's divisibility
# hints; 128 rows needed 256 KiB, over an H100's 227). `_selection_combine`: rows per program, launch options.
SELECTION_FWD_CONFIGS = ((64, dict(num_warps=4, num_stages=2)), (64, dict(num_warps=4, num_stages=1)),
                         (32, dict(num_warps=4, num_stages=1)))
_fwd_config: dict = {}
SELECTION_COMBINE_LAUNCH = (32, dict(num_warps=4))


def selection_fwd(q, k, v, scale: float, plan: SegmentPlan, gates, out, first: bool = False):
    """The selection branch's forward (NSA §3.3.2, eq. 5's o_slc) by key segment rather than by query tile: each
    selected block (and chunk of text keys) is loaded once per chunk of positions, and every (position, head) row
    that reads it attends it there (`_selection_partials`), so K/V traffic no longer grows with the top-n count
    per position; `_selection_combine` then merges each row's segments (one softmax over their union) and adds
    gate·o_slc as `segment_attention_fwd` does (``out``, ``first`` as there). The per-segment outputs are
    kept in the inputs' dtype (fp16 / bf16: one more rounding of o_slc, ~2⁻⁹ relative).

    Args: as `segment_attention_fwd`; ``plan`` a SELECTION plan with ``selected`` filled (`select_topn`).
    Returns: as `segment_attention_fwd`'s forward: (lse fp32 [B, Hq, Tq] of the branch, NaN for rows not needed;
    None)."""
    B, Hq, Tq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, GP, _ = _geometry(Hq, Hkv, q.dtype, DENSE)
    combine_rows, combine_options = SELECTION_COMBINE_LAUNCH
    BLOCK_T = max(1, combine_rows // GP)
    tables, Ns, n_txt, nsel = plan.tables(q.device)
    nslot = nsel + 1 + n_txt
    per_position = B * Hkv * G * nslot * (Dv * q.element_size() + 4)
    P = min(Tq, max(BLOCK_T, SELECTION_PARTIAL_BYTES // per_position // BLOCK_T * BLOCK_T))
    half = q.dtype != torch.float32
    configs = SELECTION_FWD_CONFIGS[0 if half else 1:]
    shape = (q.dtype, D, Dv, plan.block_n, G)
    lse = torch.full((B, Hq, Tq), float("nan"), dtype=torch.float32, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    o_part = None
    for i in range(_fwd_config.get(shape, 0), len(configs)):
        rows, options = configs[i]
        rows = max(rows, GP)
        rt = rows // G  # positions per step of `_selection_partials`
        # A text chunk is read by every video position after it: its readers are cut in runs of 4 steps, so that
        # one program does not walk a whole chunk of positions while the others, one selection block each, walk a
        # few steps (a prompt before a 128K video: ~100 ms per layer more in the 7B end to end, twelfth session).
        entries, walk = _selection_lists(plan, Tq, Hkv, P, text_piece=4 * rt)
        n_pieces = triton.cdiv(P, 4 * rt)
        walk, seg, n_items = _split_selection_walk(walk, Ns, SELECTION_PIECE_STEPS * rt, P * (nsel + 1))
        if o_part is None:  # after the lists, as in `selection_bwd`
            o_part = torch.empty(B * Hkv * P * nslot * G * Dv, dtype=q.dtype, device=q.device)
            lse_part = torch.empty(B * Hkv * P * nslot * G, dtype=torch.float32, device=q.device)
        idx64 = _indices_need_int64(o_part, q, entries)  # once per call, not per chunk
        for t0 in range(0, Tq, P):
            lse_part.fill_(float("-inf"))  # slots no segment writes (fewer than n candidates, text not yet seen)
            try:
                _selection_partials[(n_items + n_txt * n_pieces, B * Hkv)](
                    q, k, v, o_part, lse_part, entries, walk[t0 // P], seg[t0 // P], tables["block_start"],
                    tables["block_len"], tables["text"], tables["need"], tables["key_valid"], *strides, Tq, plan.tk,
                    Ns, n_items, n_txt, n_pieces, entries.shape[-1], t0, P, scale, G=G, HKV=Hkv, ROWS=rows,
                    BLOCK_N=plan.block_n, D=D, DV=Dv, NSEL=nsel, NSLOT=nslot, PRECISION="tf32" if half else "ieee",
                    HAS_KMASK=plan.key_valid is not None, IDX64=idx64, **options)
            except OutOfResources:  # raised before the launch; at the first chunk nothing was written yet
                if t0 or i + 1 == len(configs):
                    raise
                break
            _selection_combine[(triton.cdiv(min(P, Tq - t0), BLOCK_T), B * Hkv)](
                o_part, lse_part, out, lse, gates, tables["need"], *out.stride()[:3], Tq, t0, P, out.shape[-1],
                G=G, GP=GP, HKV=Hkv, DV=Dv, BLOCK_T=BLOCK_T, NSLOT=nslot, GI=plan.gate, OUT_IN=not first,
                **combine_options)
        else:  # every chunk ran
            _fwd_config[shape] = i
            break
    return lse, None


def row_dot(a, b):
    """fp32 [B, H, T]: Σ_d a·b per row of a, b [B, H, T, ·] (last strides 1; over b's width: a may be wider, e.g.
    zero-padded), products and sums in fp32 (FlashAttention-2's delta = Σ_d dO·O)."""
    B, H, T, W = b.shape
    a2, b2 = a.reshape(B * H * T, a.shape[-1]), b.reshape(B * H * T, W)
    out = torch.empty(B, H, T, dtype=torch.float32, device=b.device)
    rows = 32
    _row_dot[(triton.cdiv(B * H * T, rows),)](a2, b2, out, B * H * T, W, a2.stride(0), b2.stride(0), ROWS=rows,
                                               WP=triton.next_power_of_2(W))
    return out


# The selection backward by key segment (`selection_bwd`) keeps one dq (inputs' dtype) and Σ P·dP (fp32) per
# position, head and segment for a chunk of positions at a time, as many positions as fit in 1.5× the size of dO
# or this many bytes, whichever is larger: each chunk re-reads and re-writes the fp32 dk, dv of every block it
# touches, so larger chunks are faster (H100, 128K, forward+backward: shape A 272 / 262 / 258 ms with 0.5 / 1 /
# 2 GiB, B 275 / 271 with 1 / 2 GiB, sixteenth session; A 189.0 ms with dO's size, 185.5 with 1.5×, twentieth),
# and at long context the backward's peak stays below dense attention's (A at 128K 5017 against 5660 MiB).
SELECTION_BWD_PARTIAL_BYTES = 256 << 20


def selection_bwd_partial_bytes(grad_out_bytes: int) -> int:
    """Bytes of per-segment partials `selection_bwd` keeps per chunk of positions, for a dO of ``grad_out_bytes``
    (the rule above; `nsa_triton.memory_estimate` counts the same)."""
    return max(SELECTION_BWD_PARTIAL_BYTES, grad_out_bytes * 3 // 2)
# `_selection_bwd_partials`, fastest first: rows (positions × the group, packed) per step, launch options (H100,
# 128K, forward+backward, half precision: A 240 ms with one stage, 261 with two, 328 with 64 rows; B 275 either
# stage; sixteenth session). fp32 starts at 64 rows. The first that fits in shared memory is used, and remembered
# per shape (dtype, head dims, block, group) in _bwd_config: bf16 at head dim 256 with blocks of 128 needs 288 KiB
# for 128 rows (`scripts/check_kernels_sm90.py`; an H100 has 227).
SELECTION_BWD_CONFIGS = ((128, dict(num_warps=8, num_stages=1)), (64, dict(num_warps=4, num_stages=1)),
                         (32, dict(num_warps=4, num_stages=1)), (16, dict(num_warps=4, num_stages=1)))
_bwd_config: dict = {}


def selection_bwd(q, k, v, grad_out, gates, lse, delta, scale: float, plan: SegmentPlan, dq, dk, dv):
    """The selection branch's backward by key segment (the readers and chunks of `selection_fwd`): each
    selected block (and chunk of text keys) is loaded once per chunk of positions, and every (position, head) row
    that reads it adds there to the block's dk, dv and to its own per-segment dq (`_selection_bwd_partials`);
    `_selection_bwd_combine` sums each row's segments into ``dq``. Needs the forward's softmax statistic and
    ``delta`` instead of a pass over the blocks by query tile (FlashAttention-2's backward: delta from the saved
    output, NSA eq. 5).

    Args:
        q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]; grad_out contiguous [B, Hq, Tq, Dv] (dO of the
        op's output, not gated); gates fp32 contiguous [B, Hq, Tq, 3]; lse fp32 [B, Hq, Tq], the branch's
        log-sum-exp from the forward; delta fp32 contiguous [B, Hq, Tq], ``g_slc · Σ_d dO·o_slc``; plan: a
        SELECTION plan with ``selected``; dq fp32 [B, Hq, Tq, D], dk / dv fp32 [B, Hkv, Tk, ·] (contiguous),
        accumulated in place.
    Returns:
        fp32 [B, Hq, Tq]: ``Σ_d dO·o_slc`` of the needed rows (the selection gate's gradient), NaN elsewhere.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, GP, _ = _geometry(Hq, Hkv, q.dtype, DENSE)
    combine_rows, combine_options = SELECTION_COMBINE_LAUNCH
    BLOCK_T = max(1, combine_rows // GP)
    tables, Ns, n_txt, nsel = plan.tables(q.device)
    nslot = nsel + 1 + n_txt
    per_position = B * Hkv * G * nslot * (D * q.element_size() + 5)
    budget = selection_bwd_partial_bytes(grad_out.numel() * grad_out.element_size())
    P = min(Tq, max(BLOCK_T, budget // per_position // BLOCK_T * BLOCK_T))
    half = q.dtype != torch.float32
    configs = SELECTION_BWD_CONFIGS[0 if half else 1:]
    shape = (q.dtype, D, Dv, plan.block_n, G)
    rowd = torch.full((B, Hq, Tq), float("nan"), dtype=torch.float32, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    dq_part = None
    for i in range(_bwd_config.get(shape, 0), len(configs)):
        rows, options = configs[i]
        rows = max(rows, GP)
        piece = 4 * (rows // G)  # a text chunk's readers in runs of 4 steps, as in `selection_fwd`
        entries, walk = _selection_lists(plan, Tq, Hkv, P, text_piece=piece)
        n_pieces = triton.cdiv(P, piece)
        if dq_part is None:  # after the lists: their sort's temporaries are freed by then (peak at 128K −150 MiB)
            dq_part = torch.empty(B * Hkv * P * nslot * G * D, dtype=q.dtype, device=q.device)
            rd_part = torch.empty(B * Hkv * P * nslot * G, dtype=torch.float32, device=q.device)
            seen = torch.empty(B * Hkv * P * nslot * G, dtype=torch.int8, device=q.device)
        tdk = tdv = torch.zeros(1, dtype=torch.float32, device=q.device)
        if n_txt:
            tdk = torch.zeros(B * Hkv, n_txt * n_pieces, plan.block_n, D, dtype=torch.float32, device=q.device)
            tdv = torch.zeros(B * Hkv, n_txt * n_pieces, plan.block_n, Dv, dtype=torch.float32, device=q.device)
        idx64 = _indices_need_int64(dq_part, q, grad_out, gates, entries)  # once per call, not per chunk
        for t0 in range(0, Tq, P):
            seen.zero_()  # slots no segment writes (fewer than n candidates, text not yet seen)
            try:
                _selection_bwd_partials[(Ns + n_txt * n_pieces, B * Hkv)](
                    q, k, v, grad_out, gates, lse, delta, dq_part, rd_part, seen, dk, dv, tdk, tdv, entries,
                    walk[t0 // P], tables["block_start"], tables["block_len"], tables["text"], tables["need"],
                    tables["key_valid"], *strides, Tq, Tk, Ns, n_txt, n_pieces, entries.shape[-1], t0, P, scale,
                    G=G, HKV=Hkv, ROWS=rows, BLOCK_N=plan.block_n, D=D, DV=Dv, NSEL=nsel, NSLOT=nslot,
                    PRECISION="tf32" if half else "ieee", HAS_KMASK=plan.key_valid is not None,
                    IDX64=idx64, **options)
            except OutOfResources:  # raised before the launch; at the first chunk nothing was written yet
                if t0 or i + 1 == len(configs):
                    raise
                break
            _selection_bwd_combine[(triton.cdiv(min(P, Tq - t0), BLOCK_T), B * Hkv)](
                dq_part, rd_part, seen, dq, rowd, tables["need"], Tq, t0, P, G=G, GP=GP, HKV=Hkv, BLOCK_T=BLOCK_T,
                D=D, NSLOT=nslot, **combine_options)
        else:  # every chunk ran
            _bwd_config[shape] = i
            break
    if n_txt:
        _add_text_partials(dk, dv, tdk, tdv, plan.text, n_pieces)
    return rowd


@triton.jit
def _axis_indicator(n_dims: tl.constexpr, axis: tl.constexpr):
    """0, 1 along ``axis`` of an ``n_dims``-dimensional hypercube (size 1 elsewhere)."""
    return tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (n_dims - axis - 1))


@triton.jit
def _bitonic_merge(x, R: tl.constexpr, LOG: tl.constexpr):
    """Sort each row of x [R, 2**LOG], a bitonic sequence, in descending order: compare-and-swap rounds at strides
    2**(LOG−1) … 1 (Batcher 1968), each a max / min over one axis of the row seen as a [2]·LOG hypercube."""
    h = tl.reshape(x, [R] + [2] * LOG)
    for i in tl.static_range(LOG):
        hi = tl.max(h, axis=1 + i, keep_dims=True)
        lo = tl.min(h, axis=1 + i, keep_dims=True)
        h = tl.where(_axis_indicator(1 + LOG, 1 + i) == 0, hi, lo)
    return tl.reshape(h, [R, 2 ** LOG])


@triton.jit
def _topn(Q, KC, LSE, KEND, FIRST, WIDTH, NCAND, NEED, OUT, sqb, sqh, sqt, skb, skh, skt,
          Tq, Tk, Nc, Ns, W, scale,
          G: tl.constexpr, GP: tl.constexpr, HKV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
          D: tl.constexpr, ID_BITS: tl.constexpr, PRECISION: tl.constexpr, LOG_S: tl.constexpr,
          IDENTITY: tl.constexpr):
    """Top-N selection blocks per position of a tile. A block's score is Σ over the group's heads and over the
    compression blocks overlapping it of exp(q·k_c·scale − lse) (NSA eqs. 8-10); candidates are the first
    NCAND[position] blocks (those ending before the position's own block). Order: higher score, then lower id,
    exactly as `selection.select_block_ids` (int32 keys: the score's float bits above ID_BITS, the block id
    below); per chunk of BLOCK_S = 2**LOG_S blocks the chunk's keys are sorted and merged into the running top
    BLOCK_S (one half-cleaner and a bitonic merge: about half the compare-and-swap work of sorting both).
    OUT int32 [B, HKV, Tq, BLOCK_S] gets the ids (−1 past the candidates; the caller keeps the first n columns);
    each tile's rows of it are also the scratch through which every chunk's keys pass before their sort (below)."""
    tile = tl.program_id(0)
    b, hkv, t, t_loc, valid, p, row, q = _rows(Q, NEED, tile, tl.program_id(1), sqb, sqh, sqt, Tq, Tk, G, GP, HKV,
                                               BLOCK_T, D, 1)
    if tl.max(valid.to(tl.int32), axis=0) == 0:
        return
    lse2 = tl.load(LSE + row, mask=valid, other=float("inf")) * LOG2E
    d = tl.arange(0, D)
    k_base = KC + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    tr = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    ncand = tl.load(NCAND + b.to(tl.int64) * Tq + tr, mask=tr < Tq, other=0)
    sj = tl.arange(0, BLOCK_S)
    out = OUT + ((b * HKV + hkv).to(tl.int64) * Tq + tr)[:, None] * BLOCK_S + sj[None, :]
    out_ok = (tr < Tq)[:, None] & (sj < BLOCK_S)[None, :]  # [BLOCK_T, BLOCK_S]: the tile's rows within Tq
    best = tl.full([BLOCK_T, BLOCK_S], -1, tl.int32)
    low = (1 << ID_BITS) - 1
    for ch in range(0, tl.cdiv(tl.max(ncand, axis=0), BLOCK_S)):
        j = ch * BLOCK_S + sj
        j_ok = j < Ns
        if IDENTITY:  # block j is compression block j (H100, 128K, shape A: 12.1 → 10.2 ms for the 4 KV heads;
            # without the visibility mask below 8.7 ms, twenty-first session)
            first = j
            width = j_ok.to(tl.int32)
        else:
            first = tl.load(FIRST + b.to(tl.int64) * Ns + j, mask=j_ok, other=0)
            width = tl.load(WIDTH + b.to(tl.int64) * Ns + j, mask=j_ok, other=0)
        score = tl.zeros([BLOCK_T, BLOCK_S], tl.float32)
        for w in range(0, W):  # a loop, not unrolled: W reaches l′/d + 1 (e.g. 129 for d = 1)
            c = first + w
            c_ok = (w < width) & (c < Nc)
            kc = tl.load(k_base + c[:, None].to(tl.int64) * skt + d[None, :], mask=c_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kc), input_precision=PRECISION) * (scale * LOG2E)  # log2 units
            # rows not needed (and a group's padding rows) add 0: their q is 0 and their log-sum-exp +inf
            pr = tl.math.exp2(s - lse2[:, None])
            if not IDENTITY:  # a compression block overlapping a candidate may end after the position
                end = tl.load(KEND + b.to(tl.int64) * Nc + c, mask=c_ok, other=2147483647)
                pr = tl.where(end[None, :] <= p[:, None], pr, 0.0)
            # (with IDENTITY, every candidate block ends before the position; others get key −1 below)
            score += tl.sum(tl.reshape(pr, (BLOCK_T, GP, BLOCK_S)), axis=1)
        key = ((tl.maximum(score, 0.0).to(tl.int32, bitcast=True) >> ID_BITS) << ID_BITS) + (low - j)[None, :]
        key = tl.where(j[None, :] < ncand[:, None], key, -1)
        # The keys leave the register layout of the dot and the head sum through global memory (the tile's own rows
        # of OUT, in L1) for the layout a load gives, before the sort: in the dot's layout the sort and merge issued
        # ~4× the instructions (Nsight Compute; the kernel 20.9 → 12.0 ms for the 4 KV heads of shape A at 128K on
        # an H100, BENCHMARKS.md thirteenth session). Triton 3.6 does not move the load ahead of the store (its
        # software pipelining prefetches loads that feed a dot): the ids equal the old kernel's bit for bit at 128K
        # and the GPU tests pass; stale keys would change the ids, which the tests against the reference catch.
        tl.store(out, key, mask=out_ok)
        tl.debug_barrier()
        key = tl.load(out, mask=out_ok, other=-1)
        tl.debug_barrier()
        # best descending, the chunk ascending: their elementwise max holds the BLOCK_S largest of both, in a
        # bitonic sequence (Batcher's half-cleaner); a bitonic merge sorts it (log2 BLOCK_S compare-and-swap rounds)
        best = _bitonic_merge(tl.maximum(best, tl.sort(key, dim=1)), BLOCK_T, LOG_S)
    ids = tl.where(best >= 0, low - (best & low), -1)
    tl.store(out, ids, mask=out_ok)


def topn_geometry(layout, Tq: int) -> TopnGeometry:
    """`TopnGeometry` of ``layout`` (`common.VideoLayout`) for the last ``Tq`` positions; one host sync (``W``).
    Compute it once per call and pass it to every `select_topn` of the call."""
    Tk = layout.is_video.shape[1]
    sel_start, sel_end = layout.sel_block_start, layout.sel_block_end  # [B, Ns]
    # compression blocks overlapping each selection block: a contiguous band (blocks are ordered by position)
    first = torch.searchsorted(layout.cmp_block_end.contiguous(), sel_start.contiguous())
    last = torch.searchsorted(layout.cmp_block_start.contiguous(), sel_end.contiguous(), right=True)
    width = torch.where(sel_start < Tk, last - first, 0).clamp_min(0)
    own_start = layout.sel_start[:, Tk - Tq:]  # [B, Tq]
    ncand = torch.searchsorted(sel_end.contiguous(), own_start.contiguous())  # blocks ending before own start
    j = torch.arange(first.shape[1], device=first.device)
    # Blocks no video position may select need not match: padding blocks (start ≥ Tk), and a span's last block when
    # it is partial (no compression block of its own) and no video follows it, as in most videos (a length that is
    # not a multiple of the block; with 131,008 video tokens this took the top-n at 128K from 11.1 to 8.9 ms)
    top = torch.where(own_start < Tk, ncand, 0).amax(-1, keepdim=True) if Tq else torch.zeros_like(j)
    identity = ((width == 1) & (first == j)) | (sel_start >= Tk) | (j >= top)
    W, ident = torch.stack([width.amax(), identity.all()]).tolist() if width.numel() else (1, False)
    return TopnGeometry(first.to(torch.int32).contiguous(), width.to(torch.int32).contiguous(), max(1, W),
                        ncand.to(torch.int32).contiguous(), bool(ident))


def select_topn(q, k_cmp, lse_cmp, kend, layout, need, top_n: int, scale: float,
                geometry: TopnGeometry | None = None):
    """Top-n selection blocks of every needed query, shared by the heads of each GQA group (NSA §3.3.2); the
    Triton twin of `selection.select_block_ids` (same scores, candidates and order).

    Args:
        q: [B, Hq, Tq, D]; k_cmp: [B, Hkv, Nc, D] compressed keys; lse_cmp: fp32 [B, Hq, Tq] log-sum-exp of the
        compression branch; kend: int32 [B, Nc] last key of each compressed block; layout: `common.VideoLayout`;
        need: int8 [B, Tq] the queries to select for; top_n: n; scale: the softmax scale of the compression branch;
        geometry: `topn_geometry(layout, Tq)` when the caller has it (computed here otherwise).
    Returns:
        int32 [B, Hkv, Tq, min(n, Ns)]: block ids, −1 where fewer than n candidates exist or the row is not needed.
    Raises:
        NSAInputError: 2**20 selection blocks or more in one sequence.
    """
    from .common import NSAInputError
    from .selection import key_id_bits

    B, Hq, Tq, D = q.shape
    Hkv, Nc = k_cmp.shape[1], k_cmp.shape[2]
    Tk = layout.is_video.shape[1]
    Ns = layout.sel_block_start.shape[1]
    if Ns >= 1 << 20:
        raise NSAInputError(f"{Ns} selection blocks in one sequence exceed the top-n kernel's limit of 2**20 − 1; "
                            "raise selection_block_size or shorten the video")
    n = min(top_n, Ns)
    geo = topn_geometry(layout, Tq) if geometry is None else geometry
    G, GP, BLOCK_T = _geometry(Hq, Hkv, q.dtype, halve=D > 128)  # head dim 256 within the H100's shared memory
    BLOCK_S = max(16, triton.next_power_of_2(n))
    out = torch.full((B, Hkv, Tq, BLOCK_S), -1, dtype=torch.int32, device=q.device)
    # 8 warps for groups of ≤ 8 (shape A at 128K: 5.45 against 6.16 ms per KV head), 4 for 16 (B: 5.52 against
    # 6.31); H100, BENCHMARKS.md tenth session. The ids agree with the reference's up to near ties either way.
    _topn[(triton.cdiv(Tq, BLOCK_T), B * Hkv)](
        q, k_cmp, lse_cmp, kend, geo.first, geo.width, geo.ncand, need, out, *q.stride()[:3], *k_cmp.stride()[:3],
        Tq, Tk, Nc, Ns, geo.W, scale, G=G, GP=GP, HKV=Hkv, BLOCK_T=BLOCK_T, BLOCK_S=BLOCK_S,
        LOG_S=BLOCK_S.bit_length() - 1, D=D, IDENTITY=geo.identity,
        ID_BITS=key_id_bits(Ns), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if GP <= 8 else 4, num_stages=1 if q.dtype == torch.float32 else 2)
    return torch.where(need.bool()[:, None, :, None], out[..., :n], -1)
