"""Fused CPU kernels (numba, optional) for trim + elect + disjoint merge, streaming.

Eager torch spends most of a TIES merge on memory traffic: every step
(convert, subtract, |x|, select, mask, vote, agree, sum, divide, add, cast)
is a full pass over the tensor. These kernels read the raw inputs (bf16 bits
or float32) and do the whole method per entry, in two passes (each over blocks of
entries on a thread pool):

  1. select: the exact k-th largest |theta_i - theta_0| of each model. A 65,536-
     entry sample brackets it; one pass counts the entries above the bracket
     and collects the ~2 % inside it; the k-th is picked among those
     (np.partition). Small tensors: |delta| materialised + np.partition; if a
     bracket ever misses, two 16-bit radix histogram passes (as
     `sparsify.MagnitudeSelector`).
  2. combine: trim (|delta| >= k-th largest), elect, disjoint merge, lambda,
     + theta_0, rounded to the output dtype (bf16 round-to-nearest-even, as torch),
     branch-free so LLVM vectorises it.

DARE replaces the trim by a drop whose draw is computed per entry in a register
(the counter-based stream of `taskvec.methods.dare`), so no uniform array is drawn
or stored; mergekit's L1 rescale takes one more pass of exact integer sums. Linear
averaging is one pass; SLERP and Model Stock two (float64 dot products and norms, then
the combination); NearSwap one; RAM one (RAM+ two: exact counts first).

Semantics are exactly those of `ties.combine_deltas`, `sparsify.trim_topk`,
`dare.dare_drop`, `arithmetic.linear_average`, `slerp.slerp`, `model_stock.model_stock`,
`selective.nearswap` and `ram.ram_merge` (tests compare the paths bit for bit). `taskvec.merging.merge` uses this when numba is installed and a
tensor has at least FUSED_MIN entries; otherwise the eager torch kernels run.
Compiled kernels are cached on disk by numba; `taskvec warmup` (`warmup`) fills that
cache once, so the first merge after installing does not compile.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # optional accelerator
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

AVAILABLE = numba is not None

# Just-in-time compilation without the wait (opt-in: TASKVEC_JIT=background). The first time a run needs a
# kernel specialisation (method mode, input/output dtypes, number of models) that numba has not compiled, a
# thread compiles it on small synthetic inputs while the merge carries on with the torch path, which gives the
# same bits; once it is compiled (or loaded from numba's on-disk cache, which takes milliseconds: the first check
# waits up to JIT_FIRST_WAIT for that) the kernels take over. The thread is not a daemon: a short run waits for
# it at exit so the compiled kernels reach the cache. Not the default: on 2 busy cores the compile and the torch
# path compete for the same cores (a first TIES run at 270M took as long as compiling first), and the torch path
# holds float32 copies, so a first run's peak memory would grow. Default (sync): compile in the caller.
BACKGROUND_JIT = os.environ.get("TASKVEC_JIT", "sync").lower() == "background"
JIT_FIRST_WAIT = 1.0  # seconds the first request for a specialisation waits (a cache load is far quicker)
_JIT: dict[tuple, threading.Thread | None] = {}  # specialisation -> compiling thread, None once ready
_JIT_LOCK = threading.Lock()


def _compile(warm) -> None:
    try:
        warm()
    except Exception:  # the real call compiles (and raises) in the caller
        pass


def kernels_ready(spec: tuple, warm) -> bool:
    """Whether the kernels of `spec` are compiled; the first request starts `warm` (which runs them on
    synthetic inputs) in a thread and waits up to JIT_FIRST_WAIT for it. False: take the torch path."""
    if not BACKGROUND_JIT:
        return True
    with _JIT_LOCK:
        first = spec not in _JIT
        if first:
            _JIT[spec] = threading.Thread(target=_compile, args=(warm,), name="taskvec-jit")
            _JIT[spec].start()
        th = _JIT[spec]
    if th is None:
        return True
    th.join(JIT_FIRST_WAIT if first else 0.0)
    if th.is_alive():
        return False
    _JIT[spec] = None
    return True

MODE_SUM, MODE_PAPER, MODE_MERGEKIT = 0, 1, 2

# The kernels are serial and release the GIL (nogil); a pool of torch.get_num_threads() threads runs each over
# blocks of entries. numba's own parallel=True (prange) compiled a kernel 2-3x slower (parfor lowering: 3.5 s
# against 1.6 s for the weighted sum, measured on 2 cores) and ran it no faster, and the first merge after
# installing pays every compile. Each block's work is the same as in one serial pass, so results do not depend
# on the thread count.
BLOCK_MIN = 1 << 16  # entries per block at least
_POOL: ThreadPoolExecutor | None = None
_POOL_THREADS = 0
_POOL_LOCK = threading.Lock()


def _blocks(n: int, align: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) ranges covering n entries: up to 4 per thread (load balance), each at least BLOCK_MIN entries
    long, boundaries on multiples of `align`."""
    nblk = max(1, min(4 * torch.get_num_threads(), n // BLOCK_MIN))
    step = -(-max(n, 1) // nblk)
    step = -(-step // align) * align
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _over_blocks(fn, blocks: list[tuple[int, int]]) -> list:
    """[fn(lo, hi) for each block], in block order, spread over the kernel threads."""
    global _POOL, _POOL_THREADS
    threads = torch.get_num_threads()
    if len(blocks) <= 1 or threads <= 1:
        return [fn(lo, hi) for lo, hi in blocks]
    with _POOL_LOCK:
        if _POOL is None or _POOL_THREADS != threads:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_THREADS = ThreadPoolExecutor(threads, thread_name_prefix="taskvec-kernel"), threads
        pool = _POOL
    return list(pool.map(lambda block: fn(*block), blocks))

if AVAILABLE:
    # Inputs arrive as unsigned-integer bit patterns: uint16 for bf16 (shift 16 rebuilds the float32
    # bits), uint32 for float32 (shift 0). One kernel source, specialised by numba per array dtype.

    @njit(inline="always", cache=True)
    def _load(a, i, shift):
        return np.uint32(np.uint32(a[i]) << shift).view(np.float32)

    @njit(inline="always", cache=True)
    def _abs_bits(x):
        return np.float32(x).view(np.uint32) & np.uint32(0x7FFFFFFF)

    # Everything per element is written branch-free (comparisons become 0/1 floats) so LLVM
    # vectorises the loops: ~9x faster than the same logic with if/else.

    @njit(inline="always", cache=True)
    def _sign(x):
        return np.float32(x > 0) - np.float32(x < 0)

    @njit(inline="always", cache=True)
    def _bf16_bits(x):
        """float32 -> bf16 bit pattern, round to nearest even (as torch's .to(torch.bfloat16))."""
        u = np.float32(x).view(np.uint32)
        rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        quiet_nan = (u >> np.uint32(16)) | np.uint32(0x40)
        return np.uint16(quiet_nan if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded)

    @njit(nogil=True, cache=True)
    def _hist_high(base, models, shift, lo, hi):
        """Per model, the histogram of the high 16 bits of |delta| over entries [lo, hi)."""
        hist = np.zeros((len(models), 32768), np.int64)
        for j in range(len(models)):  # model-outer everywhere: a tuple indexed per entry is not vectorised
            a = models[j]
            for i in range(lo, hi):
                hist[j, _abs_bits(_load(a, i, shift) - _load(base, i, shift)) >> np.uint32(16)] += 1
        return hist

    @njit(nogil=True, cache=True)
    def _hist_low(base, models, shift, bins, lo, hi):
        """Per model, the histogram of the low 16 bits of the |delta| whose high bits are bins[j], over [lo, hi)."""
        hist = np.zeros((len(models), 65536), np.int64)
        for j in range(len(models)):
            a = models[j]
            for i in range(lo, hi):
                bits = _abs_bits(_load(a, i, shift) - _load(base, i, shift))
                if (bits >> np.uint32(16)) == bins[j]:
                    hist[j, bits & np.uint32(0xFFFF)] += 1
        return hist

    @njit(nogil=True, cache=True)
    def _bracket(base, models, shift, lo, hi, cap, start, stop):
        """Per model, over entries [start, stop): how many |delta| bit patterns lie above hi[j], and those
        within [lo[j], hi[j]].

        Per chunk of 2048 entries, a vectorised loop computes the bit patterns and the count
        above, then a scan of that cached chunk compacts the in-bracket ones (a few %) into `cand`.
        found[j] > cap: the capacity was too small."""
        n_mod = len(models)
        above = np.zeros(n_mod, np.int64)
        found = np.zeros(n_mod, np.int64)
        cand = np.empty((n_mod, cap + 1), np.uint32)  # slot cap: where overflowing entries land
        chunk = 2048
        buf = np.empty(chunk, np.uint32)
        for j in range(n_mod):  # one model at a time keeps the counters in registers
            lo_j, hi_j = lo[j], hi[j]
            width = hi_j - lo_j
            n_above = 0
            n_found = 0
            for c0 in range(start, stop, chunk):
                m = min(chunk, stop - c0)
                a = models[j][c0:c0 + m]  # chunk views indexed from 0: LLVM vectorises this loop, not c0 + k
                bb = base[c0:c0 + m]
                for k in range(m):
                    bits = _abs_bits(_load(a, k, shift) - _load(bb, k, shift))
                    buf[k] = bits
                    n_above += bits > hi_j
                for k in range(m):  # branch-free compaction: always store, advance only when inside
                    v = buf[k]
                    cand[j, min(n_found, cap)] = v
                    n_found += np.uint32(v - lo_j) <= width  # lo_j <= v <= hi_j in one unsigned compare
            above[j] = n_above
            found[j] = n_found
        return above, found, cand

    @njit(nogil=True, cache=True)
    def _abs_delta_bits(base, models, shift, out, lo, hi):
        """out[j, i] = |theta_j - theta_0| at entry i as float32 bit patterns, over [lo, hi) (small tensors)."""
        for j in range(len(models)):
            a = models[j]
            for i in range(lo, hi):
                out[j, i] = _abs_bits(_load(a, i, shift) - _load(base, i, shift))

    @njit(inline="always", cache=True)
    def _draw(key, i):
        """Entry i's 24-bit DARE draw: output i of SplitMix64 started at `key`, top 24 bits (see dare.py)."""
        z = key + (np.uint64(i) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) >> np.uint64(40)

    @njit(inline="always", cache=True)
    def _sparsify(x, i, threshold, key, drop, scale, dare):
        """Entry i's delta x sparsified: DARE's drop-and-rescale (`dare`, a compile-time constant) from the
        counter-based draw of (key, i), computed here (no stored uniforms), else the magnitude trim
        (|x| >= threshold). A product, not a select: a dropped negative entry is -0.0, as in dare_drop."""
        if dare:
            return x * (np.float32(_draw(key, i) >= drop) * scale)
        return x * np.float32(_abs_bits(x) >= threshold)

    @njit(nogil=True, cache=True)
    def _dare_l1_bins(base, models, shift, keys, drops, lo, hi):
        """Per model, over entries [lo, hi), the exact L1 sums of delta and of its DARE survivors as
        per-exponent mantissa sums (`dare.l1_bins`): integers, so the per-block split does not change them."""
        bins = np.zeros((len(models), 2, 254), np.int64)
        # Per chunk, a vectorised loop computes each entry's |delta| bits and whether its draw keeps it; a scalar
        # loop then adds the mantissas to four interleaved copies of the bins (entry k adds to copy k % 4):
        # neighbouring deltas share an exponent, and with one copy every add waited for the previous one. The
        # survivor add is a product, not a branch on the draw (mispredicted half the time). 148 -> 60 ms per
        # 11.5M entries of 3 models.
        chunk = 2048
        bits = np.empty(chunk, np.uint32)
        keep = np.empty(chunk, np.uint8)
        for j in range(len(models)):
            key, drop = keys[j], drops[j]
            part = np.zeros((2, 4, 254), np.int64)
            for c0 in range(lo, hi, chunk):
                n = min(chunk, hi - c0)
                a = models[j][c0:c0 + n]  # chunk views indexed from 0, so LLVM vectorises the first loop
                bb = base[c0:c0 + n]
                for k in range(n):
                    bits[k] = _abs_bits(_load(a, k, shift) - _load(bb, k, shift))
                    keep[k] = _draw(key, c0 + k) >= drop
                for k in range(n):
                    x = bits[k]
                    e = x >> np.uint32(23)
                    m = np.int64((x & np.uint32(0x7FFFFF)) | (np.uint32(e > 0) << np.uint32(23)))
                    s = min(max(np.int64(e) - 1, 0), 253)  # 253: an overflowing (inf) delta stays in bounds
                    lane = k & 3
                    part[0, lane, s] += m
                    part[1, lane, s] += m * keep[k]
            for lane in range(4):  # explicit loops: numba's array expressions here tripled the compile time
                for q in range(254):
                    bins[j, 0, q] += part[0, lane, q]
                    bins[j, 1, q] += part[1, lane, q]
        return bins

    @njit(inline="always", cache=True)
    def _store(out, i, r, out_bf16):
        if out_bf16:
            out[i] = _bf16_bits(r)
        else:
            out[i] = np.float32(r).view(np.uint32)

    # Kernels that combine several models work in chunks of CHUNK entries: per chunk, one inner loop per model
    # over that model's contiguous run, into float32 scratch rows that stay in cache. LLVM vectorises such
    # loops; indexing the tuple of models per entry (models[j][i], j innermost) it does not: chunking made
    # linear 2.5x and task arithmetic 1.7x faster (11.5M-entry bf16 tensors, 2 cores), and serial TIES
    # election 6x faster (0.61 -> 0.10 s per 11.5M entries, one thread; DARE-TIES 0.65 -> 0.15 s). Per entry
    # the operations and their order are unchanged, so results stay bit-identical.
    CHUNK = 4096

    @njit(inline="always", cache=True)
    def _scratch():
        return np.empty(CHUNK, np.float32)

    @njit(inline="always", cache=True)
    def _store_row(o, r, m, out_bf16):
        """o[:m] = the chunk's float32 results r[:m] as bf16 or float32 bit patterns. For kernels whose
        `out_bf16` is an argument, not a closure constant: the branch sits outside the loops, so each one
        vectorises (`_store` per entry, branching inside the loop, made SLERP's combination 4x slower)."""
        if out_bf16:
            for i in range(m):
                o[i] = _bf16_bits(r[i])
        else:
            for i in range(m):
                o[i] = np.float32(r[i]).view(np.uint32)

    @njit(inline="always", cache=True)
    def _base_row(a, m, shift, bv, zeroed):
        """bv[:m] = the base's float32 values over a chunk; zeroed[:m] = 0."""
        for i in range(m):
            bv[i] = _load(a, i, shift)
            zeroed[i] = np.float32(0.0)

    @njit(inline="always", cache=True)
    def _sparse_row(a, c0, m, shift, bv, threshold, key, drop, scale, d, dare):
        """d[:m] = one model's sparsified delta (`_sparsify`) over the chunk starting at entry c0. Module level,
        like every helper a kernel calls: numba does not cache a kernel whose closure holds another jitted
        function (it recompiled on every run)."""
        for i in range(m):
            d[i] = _sparsify(_load(a, i, shift) - bv[i], c0 + i, threshold, key, drop, scale, dare)

    def _make_combine_kernels(out_bf16: bool, dare: bool) -> dict:
        """The three combination kernels, writing bf16 or float32 bit patterns, sparsifying by
        magnitude trim or (`dare`) by DARE's random drop.

        `out_bf16` and `dare` are closure constants (plain bools, so the on-disk cache key is
        stable), which lets numba fold their branches away: a runtime branch there stops
        vectorisation and costs 3x. One kernel per combination rule for
        the same reason (one kernel switching on the rule ran 2-3x slower)."""

        @njit(nogil=True, cache=True)
        def _combine_sum(base, models, shift, thresholds, keys, drops, scales, weights, total, lam, normalize, out,
                         lo, hi):
            """Plain weighted sum of (trimmed) deltas: task arithmetic, or TIES without election."""
            bv, d, num = _scratch(), _scratch(), _scratch()
            for c0 in range(lo, hi, CHUNK):
                m = min(hi, c0 + CHUNK) - c0
                _base_row(base[c0:c0 + m], m, shift, bv, num)
                for j in range(len(models)):
                    _sparse_row(models[j][c0:c0 + m], c0, m, shift, bv, thresholds[j], keys[j], drops[j],
                                scales[j], d, dare)
                    w = weights[j]
                    for i in range(m):
                        num[i] += d[i] * w
                o = out[c0:c0 + m]
                for i in range(m):
                    merged = num[i] / total if normalize else num[i]
                    _store(o, i, merged * lam + bv[i], out_bf16)

        @njit(nogil=True, cache=True)
        def _combine_paper(base, models, shift, thresholds, keys, drops, scales, weights, lam, count_vote, normalize,
                           out, lo, hi):
            """Paper TIES: unweighted election, weights scale agreeing deltas, mean over |A|."""
            n_mod = len(models)
            zero = np.float32(0.0)
            one = np.float32(1.0)
            bv, vote, num, div = _scratch(), _scratch(), _scratch(), _scratch()
            d = np.empty((n_mod, CHUNK), np.float32)  # the chunk's sparsified deltas, one row per model
            for c0 in range(lo, hi, CHUNK):
                m = min(hi, c0 + CHUNK) - c0
                _base_row(base[c0:c0 + m], m, shift, bv, vote)
                for j in range(n_mod):
                    dj = d[j]
                    _sparse_row(models[j][c0:c0 + m], c0, m, shift, bv, thresholds[j], keys[j], drops[j],
                                scales[j], dj, dare)
                    for i in range(m):
                        vote[i] += _sign(dj[i]) if count_vote else dj[i]
                for i in range(m):
                    vote[i] = _sign(vote[i])  # the elected sign
                    num[i] = zero
                    div[i] = zero
                for j in range(n_mod):
                    dj = d[j]
                    w = weights[j]
                    for i in range(m):
                        agree = np.float32(_sign(dj[i]) * vote[i] > zero)  # same non-zero sign as the elected one
                        num[i] += dj[i] * w * agree
                        div[i] += agree
                o = out[c0:c0 + m]
                for i in range(m):
                    merged = num[i] / max(div[i], one) if normalize else num[i]
                    _store(o, i, merged * lam + bv[i], out_bf16)

        @njit(nogil=True, cache=True)
        def _combine_mergekit(base, models, shift, thresholds, keys, drops, scales, weights, lam, count_vote,
                              normalize, out, lo, hi):
            """mergekit TIES: weighted election (a zero vote elects +), divide by the agreeing weight."""
            n_mod = len(models)
            zero = np.float32(0.0)
            one = np.float32(1.0)
            bv, vote, num, div = _scratch(), _scratch(), _scratch(), _scratch()
            d = np.empty((n_mod, CHUNK), np.float32)  # the chunk's weighted sparsified deltas, one row per model
            for c0 in range(lo, hi, CHUNK):
                m = min(hi, c0 + CHUNK) - c0
                _base_row(base[c0:c0 + m], m, shift, bv, vote)
                for j in range(n_mod):
                    dj = d[j]
                    _sparse_row(models[j][c0:c0 + m], c0, m, shift, bv, thresholds[j], keys[j], drops[j],
                                scales[j], dj, dare)
                    w = weights[j]
                    for i in range(m):
                        dj[i] = dj[i] * w
                        vote[i] += _sign(dj[i]) if count_vote else dj[i]
                for i in range(m):
                    vote[i] = one - np.float32(2.0) * np.float32(vote[i] < zero)  # the elected sign, 0 -> +
                    num[i] = zero
                    div[i] = zero
                for j in range(n_mod):
                    dj = d[j]
                    w = weights[j]
                    for i in range(m):
                        agree = np.float32(_sign(dj[i]) == vote[i])
                        num[i] += dj[i] * agree
                        div[i] += w * agree
                o = out[c0:c0 + m]
                for i in range(m):
                    dv = div[i] + np.float32(div[i] == zero)
                    merged = num[i] / dv if normalize else num[i]
                    _store(o, i, merged * lam + bv[i], out_bf16)

        return {MODE_SUM: _combine_sum, MODE_PAPER: _combine_paper, MODE_MERGEKIT: _combine_mergekit}

    _COMBINE = {(o, d): _make_combine_kernels(o, d) for o in (True, False) for d in (True, False)}


if AVAILABLE:
    def _make_weighted_sum(out_bf16: bool):
        @njit(nogil=True, cache=True)
        def _weighted_sum(models, shift, coefs, out, lo, hi):
            """out = sum_j coefs[j] * models[j], accumulated in float32 in model order (as linear_average)."""
            acc = _scratch()
            for c0 in range(lo, hi, CHUNK):
                m = min(hi, c0 + CHUNK) - c0
                for i in range(m):
                    acc[i] = np.float32(0.0)
                for j in range(len(models)):
                    a = models[j][c0:c0 + m]
                    c = coefs[j]
                    for i in range(m):
                        acc[i] += c * _load(a, i, shift)
                o = out[c0:c0 + m]
                for i in range(m):
                    _store(o, i, acc[i], out_bf16)
        return _weighted_sum

    _WEIGHTED_SUM = {o: _make_weighted_sum(o) for o in (True, False)}


if AVAILABLE:
    # float64 sums with reassociation allowed (and nothing else): LLVM vectorises them with several partial
    # sums instead of one serial add chain; the float64 result moves by ~1e-16 relative, below what the
    # float32 coefficients computed from it can resolve in practice (tests compare the paths bit for bit)
    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _slerp_partials(a, b, shift, chunk, c_lo, c_hi):
        """Per chunk c in [c_lo, c_hi) of `chunk` entries: <a, b>, |a|^2, |b|^2 in float64 (one read of both
        tensors); row c - c_lo."""
        n_el = a.shape[0]
        part = np.zeros((c_hi - c_lo, 3), np.float64)
        for c in range(c_lo, c_hi):
            lo = c * chunk
            hi = min(n_el, lo + chunk)
            ab = 0.0
            aa = 0.0
            bb = 0.0
            for i in range(lo, hi):
                x = np.float64(_load(a, i, shift))
                y = np.float64(_load(b, i, shift))
                ab += x * y
                aa += x * x
                bb += y * y
            part[c - c_lo, 0] = ab
            part[c - c_lo, 1] = aa
            part[c - c_lo, 2] = bb
        return part

    @njit(nogil=True, cache=True)
    def _combine2(a, b, shift, c0, c1, out, out_bf16, lo, hi):
        """out = c0 * a + c1 * b in float32 (two products, one sum: as torch's `c0 * a + c1 * b`)."""
        r = _scratch()
        for s in range(lo, hi, CHUNK):
            m = min(hi, s + CHUNK) - s
            x = a[s:s + m]
            y = b[s:s + m]
            for i in range(m):
                r[i] = c0 * _load(x, i, shift) + c1 * _load(y, i, shift)
            _store_row(out[s:s + m], r, m, out_bf16)

    @njit(nogil=True, cache=True, fastmath={"reassoc"})  # as _slerp_partials
    def _gram_partials(base, models, shift, chunk, c_lo, c_hi):
        """Per chunk c in [c_lo, c_hi) of `chunk` entries: the upper triangle of the offsets' Gram matrix,
        float64 products of the float32 offsets theta_j - theta_0 (`model_stock.offset_gram`); row c - c_lo."""
        n_el = base.shape[0]
        n = len(models)
        part = np.zeros((c_hi - c_lo, n, n), np.float64)
        d = np.empty((n, chunk), np.float64)  # the chunk's offsets, one row per model
        for c in range(c_lo, c_hi):
            lo = c * chunk
            m = min(n_el, lo + chunk) - lo
            bb = base[lo:lo + m]
            for j in range(n):
                a = models[j][lo:lo + m]
                for i in range(m):
                    d[j, i] = np.float64(_load(a, i, shift) - _load(bb, i, shift))
            for j in range(n):
                for k in range(j, n):
                    acc = 0.0
                    for i in range(m):
                        acc += d[j, i] * d[k, i]
                    part[c - c_lo, j, k] = acc
        return part

    @njit(nogil=True, cache=True)
    def _model_stock_combine(base, models, shift, t, one_minus_t, n, out, out_bf16, lo, hi):
        """t * mean_j theta_j + (1 - t) * theta_0 per entry, the float32 steps of `model_stock.combine`."""
        total = _scratch()
        for c0 in range(lo, hi, CHUNK):
            m = min(hi, c0 + CHUNK) - c0
            for i in range(m):
                total[i] = np.float32(0.0)
            for j in range(len(models)):
                a = models[j][c0:c0 + m]
                for i in range(m):
                    total[i] += _load(a, i, shift)
            bb = base[c0:c0 + m]
            for i in range(m):
                total[i] = t * (total[i] / n) + one_minus_t * _load(bb, i, shift)
            _store_row(out[c0:c0 + m], total, m, out_bf16)

    @njit(nogil=True, cache=True)
    def _nearswap(base, model, shift, t, out, out_bf16, lo, hi):
        """NearSwap per entry, the float32 operations of `selective.nearswap` in its order (torch's t / x is
        reciprocal(x) * t): w = clamp(t / max(|b - m|, 1e-6), 0, 1), w m + (1 - w) b."""
        one = np.float32(1.0)
        r = _scratch()
        for s in range(lo, hi, CHUNK):
            n = min(hi, s + CHUNK) - s
            x = base[s:s + n]
            y = model[s:s + n]
            for i in range(n):
                b = _load(x, i, shift)
                m = _load(y, i, shift)
                w = min(max((one / max(abs(b - m), np.float32(1e-6))) * t, np.float32(0.0)), one)
                r[i] = w * m + (one - w) * b
            _store_row(out[s:s + n], r, n, out_bf16)

    @njit(inline="always", cache=True)
    def _contributors(base, models, shift, eps, c0, m, bv, count):
        """RAM over the chunk of m entries at c0: bv = the base's values, count = how many task vectors
        change each entry (|tau_j| > eps), as float32."""
        _base_row(base[c0:c0 + m], m, shift, bv, count)
        for j in range(len(models)):
            a = models[j][c0:c0 + m]
            for i in range(m):
                count[i] += np.float32(abs(_load(a, i, shift) - bv[i]) > eps)

    @njit(nogil=True, cache=True)
    def _ram_counts(base, models, shift, eps, lo, hi):
        """RAM+ over [lo, hi): per model, how many of its updates are shared (column 0) and unique (column 1)."""
        counts = np.zeros((len(models), 2), np.int64)
        bv, count = _scratch(), _scratch()
        for c0 in range(lo, hi, CHUNK):
            m = min(hi, c0 + CHUNK) - c0
            _contributors(base, models, shift, eps, c0, m, bv, count)
            for j in range(len(models)):
                a = models[j][c0:c0 + m]
                shared = 0
                unique = 0
                for i in range(m):
                    changed = abs(_load(a, i, shift) - bv[i]) > eps
                    shared += changed and count[i] > 1
                    unique += changed and count[i] == 1
                counts[j, 0] += shared
                counts[j, 1] += unique
        return counts

    @njit(nogil=True, cache=True)
    def _ram(base, models, shift, eps, scales, out, out_bf16, lo, hi):
        """RAM per entry, the float32 operations of `ram.ram_merge` in its order: kept deltas, unique ones
        times the model's scale (RAM+'s lambda_j; 1 for RAM), shared ones over their count, summed in model order."""
        bv, count, acc = _scratch(), _scratch(), _scratch()
        one = np.float32(1.0)
        for c0 in range(lo, hi, CHUNK):
            m = min(hi, c0 + CHUNK) - c0
            _contributors(base, models, shift, eps, c0, m, bv, count)
            for i in range(m):
                acc[i] = np.float32(0.0)
            for j in range(len(models)):
                a = models[j][c0:c0 + m]
                scale = scales[j]
                for i in range(m):
                    d = _load(a, i, shift) - bv[i]
                    kept = d * np.float32(abs(d) > eps)
                    c = count[i]
                    acc[i] += kept * np.float32(c == one) * scale + kept * np.float32(c > one) / max(c, one)
            for i in range(m):
                acc[i] = bv[i] + acc[i]
            _store_row(out[c0:c0 + m], acc, m, out_bf16)


if AVAILABLE:
    @njit(nogil=True, cache=True)  # nogil: it runs in the loader thread while the main thread merges
    def _count_nonfinite(bits, exponent):
        """How many entries have every exponent bit set (inf or NaN), from the raw bit patterns; vectorised."""
        n = 0
        for i in range(bits.shape[0]):
            n += (bits[i] & exponent) == exponent
        return n


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _welford_variance(x, out, lo, hi):
        """Population variance over axis 0 of float32 x, entries [lo, hi): Welford's float64 updates in torch's
        order (`sce.population_variance`), rounded once to float32."""
        n = x.shape[0]
        for j in range(lo, hi):
            mean = 0.0
            m2 = 0.0
            for i in range(n):
                v = np.float64(x[i, j])
                delta = v - mean
                mean += delta / (i + 1)
                m2 += delta * (v - mean)
            out[j] = m2 / n


def population_variance(flat: torch.Tensor) -> torch.Tensor:
    """torch.var(flat, dim=0, unbiased=False) of a contiguous float32 CPU [models, entries] tensor, bit for bit,
    in one pass over blocks of entries (numba must be AVAILABLE)."""
    x = flat.detach().contiguous().numpy()
    out = np.empty(x.shape[1], np.float32)
    _over_blocks(lambda lo, hi: _welford_variance(x, out, lo, hi), _blocks(x.shape[1]))
    return torch.from_numpy(out)


# float dtype -> (same-width integer dtype, exponent mask as that integer)
_EXPONENT = {
    torch.bfloat16: (torch.int16, np.int16(0x7F80)),
    torch.float16: (torch.int16, np.int16(0x7C00)),
    torch.float32: (torch.int32, np.int32(0x7F800000)),
    torch.float64: (torch.int64, np.int64(0x7FF0000000000000)),
}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`, checked on the stored bits in one pass without temporaries (numba on CPU);
    a bf16 isfinite() would cost several times more. Other devices/dtypes: torch."""
    if t.numel() == 0:
        return True
    spec = _EXPONENT.get(t.dtype)
    if AVAILABLE and spec is not None and t.device.type == "cpu" and kernels_ready(
            ("finite", t.dtype), lambda: _count_nonfinite(np.zeros(1, spec[1].dtype), spec[1])):
        int_dtype, exponent = spec
        return _count_nonfinite(t.detach().reshape(-1).view(int_dtype).numpy(), exponent) == 0
    if t.dtype in (torch.float32, torch.float64):
        lo, hi = torch.aminmax(t.detach())  # NaN propagates to both
        return bool(torch.isfinite(lo) and torch.isfinite(hi))
    return bool(torch.isfinite(t).all())


def _as_bits(t: torch.Tensor, bf16: bool) -> np.ndarray:
    """The raw bit patterns of a tensor: uint16 (bf16) or uint32 (float32, converted if needed)."""
    flat = t.detach().reshape(-1)
    if bf16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.to(torch.float32).contiguous().view(torch.int32).numpy().view(np.uint32)


def _pick_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    from_top = np.cumsum(hist[::-1])
    j = int(np.searchsorted(from_top, k))
    above = int(from_top[j - 1]) if j > 0 else 0
    return hist.shape[0] - 1 - j, above


_SAMPLE = 1 << 16
_BRACKET_MIN = 1 << 18  # below this, |delta| bits are materialised and selected with np.partition (at 2^19
# entries a bracket takes 7 ms where np.partition took 17, on bf16 deltas full of ties)
FUSED_MIN = 1 << 16  # smaller tensors take the torch path (no kernel compilation for tiny models)


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int) -> np.ndarray:
    """The sample's positions for an n-entry tensor: fixed by n (a model's tensors share a few shapes)."""
    idx = np.sort(np.random.default_rng(n).integers(0, n, _SAMPLE))
    idx.flags.writeable = False
    return idx


def _sample_abs_bits(base: np.ndarray, models: tuple, shift: np.uint32, n: int) -> list[np.ndarray]:
    """Sorted |delta| bit patterns of each model at the same pseudo-random sample of positions."""
    idx = _sample_positions(n)

    def floats(a: np.ndarray) -> np.ndarray:
        return (a[idx].astype(np.uint32) << shift).view(np.float32)

    b = floats(base)
    return [np.sort((floats(m) - b).view(np.uint32) & np.uint32(0x7FFFFFFF)) for m in models]


def _threshold_by_bracket(base, models, shift, ks) -> np.ndarray | None:
    """Exact k-th largest |delta| bits per model in ONE pass: a sample brackets the answer,
    the pass counts what lies above the bracket and keeps what lies inside, and the k-th
    largest is selected among those. None when a bracket misses (then: histograms)."""
    n = base.shape[0]
    samples = _sample_abs_bits(base, models, shift, n)
    lo = np.zeros(len(models), np.uint32)
    hi = np.zeros(len(models), np.uint32)
    for j, k in enumerate(ks):
        if k is None:
            lo[j], hi[j] = 0xFFFFFFFF, 0xFFFFFFFF  # no |delta| bit pattern gets there: nothing collected
            continue
        q = 1.0 - k / n  # fraction of entries below the threshold
        margin = 6.0 * math.sqrt(_SAMPLE * q * (1.0 - q)) + 16
        a, z = int(q * _SAMPLE - margin), int(q * _SAMPLE + margin)
        lo[j] = samples[j][a] if a > 0 else 0
        hi[j] = samples[j][z] if z < _SAMPLE else 0xFFFFFFFF
    # Expected share of entries inside [lo, hi], counted on the sample itself: bf16 deltas tie a lot (at 1.1B,
    # 2.5 % of a tensor's |delta| equal its k-th largest), and every entry equal to lo or hi is inside.
    # Capacity: twice that (plus its sampling error), per block; np.empty commits only the pages written.
    share = max((np.searchsorted(s, h, "right") - np.searchsorted(s, l, "left")) / _SAMPLE
                for s, l, h in zip(samples, lo, hi))
    share += 6.0 * math.sqrt(share * (1.0 - share) / _SAMPLE) + 16 / _SAMPLE
    if share > 0.25:  # a tie that large (say most deltas exactly 0): the radix histograms are cheaper
        return None
    blocks = _blocks(n)
    step = blocks[0][1] - blocks[0][0]
    cap = min(step, int(2 * share * step) + 4096)
    parts = _over_blocks(lambda start, stop: _bracket(base, models, shift, lo, hi, cap, start, stop), blocks)
    out = np.zeros(len(models), np.uint32)
    for j, k in enumerate(ks):
        if k is None:
            continue
        if any(found[j] > cap for _, found, _ in parts):
            return None
        inside = np.concatenate([cand[j, : found[j]] for _, found, cand in parts])
        r = k - sum(int(above[j]) for above, _, _ in parts)  # the answer is the r-th largest inside the bracket
        if not 1 <= r <= inside.size:
            return None
        out[j] = _rth_largest(inside, r, lo[j], hi[j])
    return out


_COUNT_MAX = 1 << 22  # widest bracket (in bit patterns) counted per pattern: 32 MiB of int64 counts at most


def _rth_largest(values: np.ndarray, r: int, lo: np.uint32, hi: np.uint32) -> np.uint32:
    """The r-th largest of `values` (uint32 bit patterns, all within [lo, hi]).

    A bracket of bf16 deltas holds few distinct patterns in long runs of ties, and there np.partition's
    introselect slows twenty-fold (29 ms for 290 k entries of 135 values at 1.1B); a count per pattern
    (np.bincount) takes the same time whatever the ties, when the bracket is narrow."""
    width = int(hi) - int(lo)
    if width <= min(_COUNT_MAX, 8 * values.size + (1 << 16)):
        offset, _ = _pick_bin(np.bincount(values - lo, minlength=width + 1), r)
        return np.uint32(int(lo) + offset)
    return np.partition(values, values.size - r)[values.size - r]


def threshold_bits(base, models, shift, ks: list[int | None]) -> np.ndarray:
    """Per model, the float32 bit pattern of the exact k-th largest |delta| (0 = keep everything)."""
    out = np.zeros(len(models), np.uint32)
    need = [j for j, k in enumerate(ks) if k is not None]
    if not need:
        return out
    if base.shape[0] < _BRACKET_MIN:  # small: materialise |delta| bits and select directly
        n = base.shape[0]
        bits = np.empty((len(models), n), np.uint32)
        _over_blocks(lambda lo, hi: _abs_delta_bits(base, models, shift, bits, lo, hi), _blocks(n))
        for j in need:
            out[j] = np.partition(bits[j], n - ks[j])[n - ks[j]]
        return out
    bracketed = _threshold_by_bracket(base, models, shift, ks)
    if bracketed is not None:
        return bracketed
    blocks = _blocks(base.shape[0])
    high = sum(_over_blocks(lambda lo, hi: _hist_high(base, models, shift, lo, hi), blocks))
    bins = np.zeros(len(models), np.uint32)
    above = [0] * len(models)
    for j in need:
        b, above[j] = _pick_bin(high[j], ks[j])
        bins[j] = b
    low = sum(_over_blocks(lambda lo, hi: _hist_low(base, models, shift, bins, lo, hi), blocks))
    for j in need:
        lo, _ = _pick_bin(low[j], ks[j] - above[j])
        out[j] = (int(bins[j]) << 16) | lo
    return out


OUT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)  # float16: computed as float32, converted once


def _output(shape, out_dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray, bool]:
    """(result tensor, its flat bit patterns for a kernel to write, whether they are bf16): bf16 results are
    written as bf16 bits, float32 and float16 results as float32 bits (`_finish` converts float16)."""
    out_bf16 = out_dtype == torch.bfloat16
    result = torch.empty(shape, dtype=torch.bfloat16 if out_bf16 else torch.float32)
    out = result.reshape(-1).view(torch.int16 if out_bf16 else torch.int32).numpy()
    return result, out.view(np.uint16 if out_bf16 else np.uint32), out_bf16


def _finish(result: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return result if out_dtype != torch.float16 else result.to(torch.float16)


def _applicable(tensors: list[torch.Tensor], out_dtype: torch.dtype) -> bool:
    """Whether a fused kernel takes these tensors: numba present, CPU, same shape, at least FUSED_MIN entries."""
    return (AVAILABLE and bool(tensors) and all(t.device.type == "cpu" and t.shape == tensors[0].shape
                                                 for t in tensors)
            and tensors[0].numel() >= FUSED_MIN and out_dtype in OUT_DTYPES)


def _chunk_blocks(n: int, chunk: int) -> list[tuple[int, int]]:
    """Blocks of 4 chunk indices (the float64 reductions: one partial sum per chunk, added in order after)."""
    n_chunk = -(-n // chunk)
    return [(lo, min(n_chunk, lo + 4)) for lo in range(0, n_chunk, 4)]


def _raw_inputs(tensors: list[torch.Tensor], out_dtype: torch.dtype, spec: tuple, warm, sync: bool):
    """(shift, the tensors' stored bit patterns) for a fused kernel; None when none applies (`_applicable`),
    or while `spec`'s kernels compile in the background (TASKVEC_JIT=background; `warm` compiles them)."""
    if not _applicable(tensors, out_dtype):
        return None
    bf16 = all(t.dtype == torch.bfloat16 for t in tensors)
    if not sync and not kernels_ready((*spec, bf16, len(tensors), out_dtype), warm):
        return None
    return np.uint32(16 if bf16 else 0), [_as_bits(t, bf16) for t in tensors]


def fused_task_arithmetic(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    densities: list[float] | None,
    thresholds: list[float | None] | None,
    weights: list[float],
    lam: float,
    mode: int,
    count_vote: bool,
    normalize: bool,
    out_dtype: torch.dtype,
    dare: tuple[list[float], bool | str, list[torch.Generator]] | None = None,
    _sync: bool = False,
) -> torch.Tensor | None:
    """Sparsify (magnitude trim, or DARE with `dare` = (drop rates, rescale True/False/"l1", generators)) +
    combine + scale + add in fused passes; None when not applicable (numba missing, non-CPU
    tensors, small tensors, unusual dtypes): the caller then runs the torch path."""
    from .sparsify import keep_count

    if not _applicable([base, *tensors], out_dtype):
        return None
    bf16 = base.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in tensors)
    select = thresholds is None and densities is not None and any(d < 1.0 for d in densities)
    spec = ("gta", bf16, len(tensors), mode, count_vote, normalize, out_dtype, select, dare is not None,
            dare is not None and dare[1] == "l1")

    def warm():  # the same specialisations on synthetic inputs: both selection sizes when trimming
        from .dare import tensor_generator

        for n_el in (FUSED_MIN, _BRACKET_MIN) if select else (FUSED_MIN,):
            g = torch.Generator().manual_seed(0)
            b0 = torch.randn(n_el, generator=g).to(base.dtype)
            ts = [(b0.float() + torch.randn(n_el, generator=g)).to(t.dtype) for t in tensors]
            fused_task_arithmetic(
                b0, ts, densities=densities, thresholds=thresholds, weights=weights, lam=lam, mode=mode,
                count_vote=count_vote, normalize=normalize, out_dtype=out_dtype, _sync=True,
                dare=None if dare is None else (dare[0], dare[1], [tensor_generator(0, "w")] * len(tensors)))

    if not _sync and not kernels_ready(spec, warm):
        return None
    shift = np.uint32(16 if bf16 else 0)
    b = _as_bits(base, bf16)
    ms = tuple(_as_bits(t, bf16) for t in tensors)
    n = b.shape[0]
    blocks = _blocks(n)
    tbits = np.zeros(len(ms), np.uint32)
    if thresholds is not None and any(x is not None for x in thresholds):
        tbits = np.array([np.float32(max(x, 0.0)).view(np.uint32) for x in thresholds], np.uint32)
    elif densities is not None:
        tbits = threshold_bits(b, ms, shift, [None if d >= 1.0 else keep_count(n, d) for d in densities])
    w = np.asarray(weights, np.float32)
    total = np.float32(w.sum(dtype=np.float32)) if mode == MODE_SUM else np.float32(1.0)
    if mode == MODE_SUM and normalize and abs(float(total)) < 1e-8:
        return None  # the torch path raises (paper) or leaves the sum undivided (mergekit)
    if dare is not None:  # the counter-based draws of dare_drop, computed in the kernel (taskvec.methods.dare)
        from .dare import bins_total, dare_key, drop_threshold, l1_factor

        drop_rates, rescale, generators = dare
        keys = np.array([dare_key(g) for g in generators], np.uint64)
        drops = np.array([drop_threshold(p) for p in drop_rates], np.uint64)
        if rescale == "l1":
            bins = sum(_over_blocks(lambda lo, hi: _dare_l1_bins(b, ms, shift, keys, drops, lo, hi), blocks))
            factors = [l1_factor(bins_total(bins[j, 0]), bins_total(bins[j, 1])) for j in range(len(ms))]
            scales = np.array([1.0 if f is None else f for f in factors], np.float32)
        else:
            scales = np.array([1.0 / (1.0 - p) if rescale and p > 0 else 1.0 for p in drop_rates], np.float32)
    else:
        keys = np.zeros(len(ms), np.uint64)
        drops = np.zeros(len(ms), np.uint64)
        scales = np.zeros(len(ms), np.float32)
    result, out, out_bf16 = _output(base.shape, out_dtype)
    kernel = _COMBINE[(out_bf16, dare is not None)][mode]
    common = (b, ms, shift, tbits, keys, drops, scales, w)
    rest = (total, np.float32(lam), normalize) if mode == MODE_SUM else (np.float32(lam), count_vote, normalize)
    _over_blocks(lambda lo, hi: kernel(*common, *rest, out, lo, hi), blocks)
    return _finish(result, out_dtype)



def fused_linear(tensors: list[torch.Tensor], weights: list[float], *, normalize: bool,
                 out_dtype: torch.dtype, _sync: bool = False) -> torch.Tensor | None:
    """Weighted average (linear merge) straight from the stored bits in one pass; None when not
    applicable (numba missing, non-CPU or small tensors, a zero weight sum): the torch path runs."""
    total = sum(float(w) for w in weights)
    if normalize and abs(total) < 1e-12:
        return None  # the torch path raises the explanatory error
    warm = lambda: fused_linear([torch.zeros(FUSED_MIN, dtype=t.dtype) for t in tensors], weights,  # noqa: E731
                                normalize=normalize, out_dtype=out_dtype, _sync=True)
    raw = _raw_inputs(tensors, out_dtype, ("linear",), warm, _sync)
    if raw is None:
        return None
    shift, ms = raw[0], tuple(raw[1])
    coefs = np.asarray([float(w) / total if normalize else float(w) for w in weights], np.float32)
    result, out, out_bf16 = _output(tensors[0].shape, out_dtype)
    kernel = _WEIGHTED_SUM[out_bf16]
    _over_blocks(lambda lo, hi: kernel(ms, shift, coefs, out, lo, hi), _blocks(ms[0].shape[0]))
    return _finish(result, out_dtype)

def fused_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, *, out_dtype: torch.dtype,
                _sync: bool = False) -> torch.Tensor | None:
    """SLERP in two passes over the stored bits: the float64 dot product and both norms in one reduction,
    then c0 v0 + c1 v1 rounded to `out_dtype`. The same chunked float64 sums and float32 coefficients as
    `slerp.slerp` (see its docstring); None when not applicable (the torch path runs)."""
    from .slerp import CHUNK, slerp_coefficients

    warm = lambda: fused_slerp(torch.ones(FUSED_MIN, dtype=v0.dtype), torch.zeros(FUSED_MIN, dtype=v1.dtype),  # noqa: E731
                               t, out_dtype=out_dtype, _sync=True)
    raw = _raw_inputs([v0, v1], out_dtype, ("slerp",), warm, _sync)
    if raw is None:
        return None
    shift, (a, b) = raw
    ab = aa = bb = 0.0
    parts = _over_blocks(lambda c_lo, c_hi: _slerp_partials(a, b, shift, CHUNK, c_lo, c_hi),
                         _chunk_blocks(a.shape[0], CHUNK))
    for row in np.concatenate(parts):  # chunks added in order, as slerp_sums does
        ab += float(row[0])
        aa += float(row[1])
        bb += float(row[2])
    c0, c1 = slerp_coefficients(t, ab, aa, bb)
    result, out, out_bf16 = _output(v0.shape, out_dtype)
    c0, c1 = np.float32(c0), np.float32(c1)
    _over_blocks(lambda lo, hi: _combine2(a, b, shift, c0, c1, out, out_bf16, lo, hi), _blocks(a.shape[0]))
    return _finish(result, out_dtype)


def fused_nearswap(base: torch.Tensor, model: torch.Tensor, t: float, *, out_dtype: torch.dtype,
                   _sync: bool = False) -> torch.Tensor | None:
    """NearSwap (`selective.nearswap`) in one pass over the stored bits, bit-identical; None when not applicable."""
    warm = lambda: fused_nearswap(torch.zeros(FUSED_MIN, dtype=base.dtype), torch.ones(FUSED_MIN, dtype=model.dtype),  # noqa: E731
                                  t, out_dtype=out_dtype, _sync=True)
    raw = _raw_inputs([base, model], out_dtype, ("nearswap",), warm, _sync)
    if raw is None:
        return None
    shift, (b, m) = raw
    result, out, out_bf16 = _output(base.shape, out_dtype)
    t32 = np.float32(t)
    _over_blocks(lambda lo, hi: _nearswap(b, m, shift, t32, out, out_bf16, lo, hi), _blocks(b.shape[0]))
    return _finish(result, out_dtype)


def fused_ram(base: torch.Tensor, tensors: list[torch.Tensor], epsilon: float, *, out_dtype: torch.dtype,
              plus: tuple[float, float] | None = None, _sync: bool = False) -> torch.Tensor | None:
    """RAM (`ram.ram_merge`), or with `plus` = (r, alpha) RAM+ tensor-local (its per-model scales from exact
    integer counts, a first pass), straight from the stored bits, bit-identical; None when not applicable."""
    from .ram import ramplus_scales_from_counts

    warm = lambda: fused_ram(torch.zeros(FUSED_MIN, dtype=base.dtype),  # noqa: E731
                             [torch.ones(FUSED_MIN, dtype=t.dtype) for t in tensors], epsilon,
                             out_dtype=out_dtype, plus=plus, _sync=True)
    raw = _raw_inputs([base, *tensors], out_dtype, ("ram", plus is not None), warm, _sync)
    if raw is None:
        return None
    shift, (b, *rest) = raw
    ms = tuple(rest)
    eps = np.float32(epsilon)  # torch compares float32 |tau| with the float32 epsilon too
    blocks = _blocks(b.shape[0])
    scales = np.ones(len(ms), np.float32)
    if plus is not None:
        counts = torch.from_numpy(sum(_over_blocks(lambda lo, hi: _ram_counts(b, ms, shift, eps, lo, hi), blocks)))
        scales = ramplus_scales_from_counts(counts[:, 0], counts[:, 1], epsilon, *plus).numpy().astype(np.float32)
    result, out, out_bf16 = _output(base.shape, out_dtype)
    _over_blocks(lambda lo, hi: _ram(b, ms, shift, eps, scales, out, out_bf16, lo, hi), blocks)
    return _finish(result, out_dtype)


def fused_model_stock(base: torch.Tensor, tensors: list[torch.Tensor], *, clamp: bool, out_dtype: torch.dtype,
                      _sync: bool = False) -> torch.Tensor | None:
    """Model Stock over the whole tensor (not filter_wise) in two passes over the stored bits: the offsets'
    chunked float64 Gram matrix, then t * mean + (1 - t) * base. The same chunks and float32 ratio as
    `model_stock.model_stock` (see its docstring); None when not applicable (the torch path runs)."""
    from .model_stock import CHUNK, ratio_from_gram

    warm = lambda: fused_model_stock(torch.zeros(FUSED_MIN, dtype=base.dtype),  # noqa: E731
                                     [torch.ones(FUSED_MIN, dtype=t.dtype) for t in tensors], clamp=clamp,
                                     out_dtype=out_dtype, _sync=True)
    raw = _raw_inputs([base, *tensors], out_dtype, ("model_stock",), warm, _sync)
    if raw is None or len(tensors) < 2:
        return None
    shift, (b, *rest) = raw
    ms = tuple(rest)
    gram = np.zeros((len(ms), len(ms)), np.float64)
    for part in np.concatenate(_over_blocks(lambda c_lo, c_hi: _gram_partials(b, ms, shift, CHUNK, c_lo, c_hi),
                                            _chunk_blocks(b.shape[0], CHUNK))):
        gram += part  # chunks added in order, as offset_gram does
    gram = np.triu(gram) + np.triu(gram, 1).T
    t = np.float32(ratio_from_gram(torch.from_numpy(gram), clamp=clamp))
    one_minus_t = np.float32(1.0) - t
    result, out, out_bf16 = _output(base.shape, out_dtype)
    n = np.float32(len(ms))
    _over_blocks(lambda lo, hi: _model_stock_combine(b, ms, shift, t, one_minus_t, n, out, out_bf16, lo, hi),
                 _blocks(b.shape[0]))
    return _finish(result, out_dtype)
