"""The selective scan as Triton kernels, forward and backward: the GPU training path.

Same contract as ``model.scan.selective_scan_ref`` (u, delta (B, L, E); A (E, N); B, C (B, L, N);
D (E,) or None; returns y (B, L, E) and, with ``return_final_state``, h[L-1] (B, E, N)):

    h[t] = exp(delta[t, e] * A[e, n]) * h[t-1] + delta[t, e] * B[t, n] * u[t, e],   h[-1] = 0
    y[t, e] = sum_n C[t, n] * h[t, e, n] + D[e] * u[t, e]

Design. A program owns one batch element b, one block of BLOCK_E channels (all N states: y sums
over n) and one *segment* of consecutive chunks of T = CHUNK tokens. It walks its tokens one at a
time, the (BLOCK_E, N) state in registers, loading each token's row of u, delta (E is contiguous)
and of B, C; the next token's row is loaded while the current one is computed (a manual one-step
prefetch: the loop is latency-bound otherwise). The forward writes no (L, E, N) tensor.

Grid (channel blocks, segments, batch). With one segment per sequence (CPU interpreter, or a
large batch that fills the GPU by itself) the forward is one pass. With S > 1 segments (batch 1
on a GPU, where B x E / BLOCK_E programs cannot fill the machine) it is three passes:
1. ``_fwd_local_kernel``: each segment scanned from a zero state: its end state and its total
   decay exp(A * sum(delta)), (B, S, E, N) each.
2. ``_carry_kernel``: one program per (b, channel block) combines those S summaries in order,
   giving the state entering each segment.
3. ``_fwd_kernel``: each segment scanned again from its entering state, writing y; at the start of
   every chunk it writes the state entering that chunk. Those are what the backward keeps.
The segment count is chosen by ``_plan`` from the batch, the channel blocks and the GPU's SM count.

Saved for backward: the inputs and the state entering every chunk, (B, ceil(L / T), E, N) float32:
with T = 32 and N = 16 half the size of u in float32.

Backward mirrors it, as mamba-ssm's kernel does (save the state every T tokens, recompute each
chunk, run the reverse recurrence). With S > 1, ``_bwd_local_kernel`` runs each segment's reverse
recurrence from a zero carry and ``_carry_kernel`` carries the state gradients right to left from
the final-state gradient. ``_bwd_kernel`` then walks the chunks of its segment from last to first:
- a forward loop recomputes the chunk's states from the saved one entering it, writing
  r[t] = exp(delta[t] * A) * h[t-1] into a (T, BLOCK_E, N) scratch slot of its own (one per
  program, reused chunk after chunk: (B, S, T, E, N) in all, 50 MB at batch 128 with three
  segments, small enough to stay in a GPU's L2 cache) and the chunk's dC rows;
- a reverse loop runs g[t] = dy[t] * C[t] + exp(delta[t+1] * A) * g[t+1], starting from the
  gradient carried in from the next chunk (or the final-state gradient), reads r[t] back for the
  decay's gradient g[t] * r[t], and writes du, ddelta and the chunk's dB rows.
Registers cannot be indexed by t, hence the scratch: mamba-ssm keeps the same values in shared
memory, which Triton does not expose for dynamic indexing.

dB and dC sum over channels: each channel block writes its own partial sums and torch adds them
in a fixed order (no atomics), as it does dA's per-(batch, segment) partials, so gradients are
deterministic. dD = sum(dy * u) is computed in torch.

Precision: float32 arithmetic and accumulation throughout; float16/bfloat16 inputs are read as
they are and upcast in registers; y and the final state come back in u's dtype, each gradient in
its input's dtype (as the other forms). float64 inputs are refused (the kernels compute in float32;
use scan='reference' or 'chunked' for float64). The kernels use no tl.dot, so no TF32.

On the CPU the kernels run under Triton's interpreter when TRITON_INTERPRET=1 is set before this
module is imported (the variable is read when the kernels are decorated): slow, for tests only.
The interpreter accepts code the compiler rejects, so ``compile_kernels`` also compiles every
kernel for a GPU architecture without a GPU (tests/test_scan_triton.py does, for sm_90).
benchmarks/gpu_check.py is the check to run on a GPU: correctness there, speed, a training step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # model/ imports with torch alone; selective_scan_triton raises when called
    triton = None
    tl = None

CHUNK = 32  # T: tokens between saved states; backward recomputes one chunk at a time
MAX_BLOCK_E = 16  # channels per program: more programs, and dB/dC sums stay within a warp or two
PROGRAMS_PER_SM = 8  # _plan splits sequences into segments until the grid has this many per SM

INSTALL_HINT = "install it with `pip install -e .[dev]` (or `pip install triton`)"

ScanResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def triton_available() -> bool:
    """True when the Triton scan can run here: Triton imports, and either a CUDA device is present
    or the kernels were decorated under the interpreter (TRITON_INTERPRET=1). Never raises."""
    try:
        if triton is None:
            return False
        return _interpreted() or torch.cuda.is_available()
    except Exception:
        return False


def _interpreted() -> bool:
    # Triton picks the interpreter when a kernel is decorated, not when it is launched.
    return triton is not None and type(_fwd_kernel).__name__ == "InterpretedFunction"


if triton is not None:
    # Each loop walks row pointers (one row of E channels or N states per token) and loads the
    # next token's rows before computing the current one; the last step re-reads its own rows
    # (step 0) so that no load leaves the tensor.

    @triton.jit
    def _fwd_local_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, end_ptr, decay_ptr,
        L, E, N, seg_len, n_seg,
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Each segment from a zero state: its end state and exp(A * sum of its deltas)."""
        pid_e, seg, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        me, mn = offs_e < E, offs_n < N
        m2 = me[:, None] & mn[None, :]
        tile = offs_e[:, None] * N + offs_n[None, :]
        A = tl.load(A_ptr + tile, mask=m2, other=0.0).to(tl.float32)
        t0 = seg * seg_len
        t1 = tl.minimum(t0 + seg_len, L)
        row = b * L * E + t0 * E + offs_e  # row t0 of a (B, L, E) tensor
        row_n = b * L * N + t0 * N + offs_n  # row t0 of a (B, L, N) tensor
        p_d, p_u, p_B = delta_ptr + row, u_ptr + row, B_ptr + row_n

        h = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        dsum = tl.zeros([BLOCK_E], dtype=tl.float32)
        d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
        u_n = tl.load(p_u, mask=me, other=0.0).to(tl.float32)
        B_n = tl.load(p_B, mask=mn, other=0.0).to(tl.float32)
        t_last = t1 - 1
        for t in range(t0, t1):
            d, uu, Bt = d_n, u_n, B_n
            more = t < t_last
            se, sn = tl.where(more, E, 0), tl.where(more, N, 0)
            p_d, p_u, p_B = p_d + se, p_u + se, p_B + sn
            d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
            u_n = tl.load(p_u, mask=me, other=0.0).to(tl.float32)
            B_n = tl.load(p_B, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp(d[:, None] * A) * h + (d * uu)[:, None] * Bt[None, :]
            dsum += d
        out = (b * n_seg + seg) * E * N + tile
        tl.store(end_ptr + out, h, mask=m2)
        tl.store(decay_ptr + out, tl.exp(dsum[:, None] * A), mask=m2)

    @triton.jit
    def _carry_kernel(
        end_ptr, decay_ptr, init_ptr, out_ptr,
        E, N, n_seg,
        REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """s = h entering each segment: s[k+1] = decay[k] * s[k] + end[k] (right to left if REVERSE)."""
        pid_e, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        m2 = (offs_e < E)[:, None] & (offs_n < N)[None, :]
        tile = offs_e[:, None] * N + offs_n[None, :]
        if HAS_INIT:
            s = tl.load(init_ptr + b * E * N + tile, mask=m2, other=0.0).to(tl.float32)
        else:
            s = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        for i in range(n_seg):
            if REVERSE:
                k = n_seg - 1 - i
            else:
                k = i
            at = (b * n_seg + k) * E * N + tile
            tl.store(out_ptr + at, s, mask=m2)
            s = tl.load(decay_ptr + at, mask=m2, other=0.0) * s + tl.load(end_ptr + at, mask=m2, other=0.0)

    @triton.jit
    def _fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, enter_ptr, saved_ptr, final_ptr,
        L, E, N, T, chunks_per_seg, n_seg, n_chunks,
        HAS_D: tl.constexpr, SAVE: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """y for one segment, from the state entering it; saves the state entering each chunk."""
        pid_e, seg, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        me, mn = offs_e < E, offs_n < N
        m2 = me[:, None] & mn[None, :]
        tile = offs_e[:, None] * N + offs_n[None, :]
        A = tl.load(A_ptr + tile, mask=m2, other=0.0).to(tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_e, mask=me, other=0.0).to(tl.float32)
        c0 = seg * chunks_per_seg
        c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
        t0 = c0 * T
        t1 = tl.minimum(c1 * T, L)
        row = b * L * E + t0 * E + offs_e
        row_n = b * L * N + t0 * N + offs_n
        p_d, p_u, p_B, p_C, p_y = delta_ptr + row, u_ptr + row, B_ptr + row_n, C_ptr + row_n, y_ptr + row
        p_saved = saved_ptr + (b * n_chunks + c0) * E * N + tile

        h = tl.load(enter_ptr + (b * n_seg + seg) * E * N + tile, mask=m2, other=0.0)
        d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
        u_n = tl.load(p_u, mask=me, other=0.0).to(tl.float32)
        B_n = tl.load(p_B, mask=mn, other=0.0).to(tl.float32)
        C_n = tl.load(p_C, mask=mn, other=0.0).to(tl.float32)
        t_last = t1 - 1
        for c in range(c0, c1):
            if SAVE:  # the state entering chunk c: what the backward starts from
                tl.store(p_saved, h, mask=m2)
                p_saved += E * N
            for t in range(c * T, tl.minimum(c * T + T, L)):
                d, uu, Bt, Ct = d_n, u_n, B_n, C_n
                more = t < t_last
                se, sn = tl.where(more, E, 0), tl.where(more, N, 0)
                p_d, p_u, p_B, p_C = p_d + se, p_u + se, p_B + sn, p_C + sn
                d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
                u_n = tl.load(p_u, mask=me, other=0.0).to(tl.float32)
                B_n = tl.load(p_B, mask=mn, other=0.0).to(tl.float32)
                C_n = tl.load(p_C, mask=mn, other=0.0).to(tl.float32)
                h = tl.exp(d[:, None] * A) * h + (d * uu)[:, None] * Bt[None, :]
                y = tl.sum(h * Ct[None, :], axis=1)  # (BLOCK_E,)
                if HAS_D:
                    y += Dv * uu
                tl.store(p_y, y.to(y_ptr.dtype.element_ty), mask=me)
                p_y += E
        if seg == n_seg - 1:
            tl.store(final_ptr + b * E * N + tile, h, mask=m2)

    @triton.jit
    def _bwd_local_kernel(
        delta_ptr, A_ptr, C_ptr, dy_ptr, w_ptr, decay_ptr,
        L, E, N, seg_len, n_seg,
        BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Each segment's reverse recurrence from a zero carry: the gradient it sends to the state
        before it, exp(a[t0]) * g[t0], and its total decay exp(A * sum of its deltas)."""
        pid_e, seg, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        me, mn = offs_e < E, offs_n < N
        m2 = me[:, None] & mn[None, :]
        tile = offs_e[:, None] * N + offs_n[None, :]
        A = tl.load(A_ptr + tile, mask=m2, other=0.0).to(tl.float32)
        t0 = seg * seg_len
        t1 = tl.minimum(t0 + seg_len, L)
        row = b * L * E + (t1 - 1) * E + offs_e  # the segment's last row, walked backwards
        row_n = b * L * N + (t1 - 1) * N + offs_n
        p_d, p_g, p_C = delta_ptr + row, dy_ptr + row, C_ptr + row_n

        carry = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)  # gradient on h[t] from after t
        dsum = tl.zeros([BLOCK_E], dtype=tl.float32)
        d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
        g_n = tl.load(p_g, mask=me, other=0.0).to(tl.float32)
        C_n = tl.load(p_C, mask=mn, other=0.0).to(tl.float32)
        span = t1 - 1 - t0
        for i in range(t1 - t0):
            d, dyt, Ct = d_n, g_n, C_n
            more = i < span
            se, sn = tl.where(more, E, 0), tl.where(more, N, 0)
            p_d, p_g, p_C = p_d - se, p_g - se, p_C - sn
            d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
            g_n = tl.load(p_g, mask=me, other=0.0).to(tl.float32)
            C_n = tl.load(p_C, mask=mn, other=0.0).to(tl.float32)
            carry = tl.exp(d[:, None] * A) * (dyt[:, None] * Ct[None, :] + carry)
            dsum += d
        out = (b * n_seg + seg) * E * N + tile
        tl.store(w_ptr + out, carry, mask=m2)
        tl.store(decay_ptr + out, tl.exp(dsum[:, None] * A), mask=m2)

    @triton.jit
    def _bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, saved_ptr, carry_ptr, r_ptr,
        du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,
        L, E, N, T, chunks_per_seg, n_seg, n_chunks, batch,
        HAS_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """All gradients for one segment, chunk by chunk from its last (see the module docstring)."""
        pid_e, seg, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        me, mn = offs_e < E, offs_n < N
        m2 = me[:, None] & mn[None, :]
        tile = offs_e[:, None] * N + offs_n[None, :]
        A = tl.load(A_ptr + tile, mask=m2, other=0.0).to(tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_e, mask=me, other=0.0).to(tl.float32)
        seq = b * L * E + offs_e  # row 0 of a (B, L, E) tensor
        bc = b * L * N + offs_n  # row 0 of a (B, L, N) tensor
        part = (pid_e * batch + b) * L * N + offs_n  # row 0 of this block's dB / dC partials
        work = r_ptr + (b * n_seg + seg) * T * E * N + tile  # this program's (T, E, N) scratch, slot 0
        c0 = seg * chunks_per_seg
        c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
        EN = E * N

        # gradient on the state at the segment's last token from everything after it
        carry = tl.load(carry_ptr + (b * n_seg + seg) * E * N + tile, mask=m2, other=0.0).to(tl.float32)
        dA_acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        for ci in range(c1 - c0):
            c = c1 - 1 - ci
            t0 = c * T
            t1 = tl.minimum(t0 + T, L)

            # Forward: recompute the chunk's states from the saved one entering it, keeping
            # r[t] = exp(delta[t] A) h[t-1] in the scratch for the reverse loop; dC[t] = dy[t] . h[t].
            h = tl.load(saved_ptr + (b * n_chunks + c) * E * N + tile, mask=m2, other=0.0)
            p_d, p_u, p_g = delta_ptr + seq + t0 * E, u_ptr + seq + t0 * E, dy_ptr + seq + t0 * E
            p_B, p_dC, p_r = B_ptr + bc + t0 * N, dC_ptr + part + t0 * N, work
            d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
            u_n = tl.load(p_u, mask=me, other=0.0).to(tl.float32)
            g_n = tl.load(p_g, mask=me, other=0.0).to(tl.float32)
            B_n = tl.load(p_B, mask=mn, other=0.0).to(tl.float32)
            t_last = t1 - 1
            for t in range(t0, t1):
                d, uu, dyt, Bt = d_n, u_n, g_n, B_n
                more = t < t_last
                se, sn = tl.where(more, E, 0), tl.where(more, N, 0)
                p_d, p_u, p_g, p_B = p_d + se, p_u + se, p_g + se, p_B + sn
                d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
                u_n = tl.load(p_u, mask=me, other=0.0).to(tl.float32)
                g_n = tl.load(p_g, mask=me, other=0.0).to(tl.float32)
                B_n = tl.load(p_B, mask=mn, other=0.0).to(tl.float32)
                r = tl.exp(d[:, None] * A) * h
                tl.store(p_r, r, mask=m2)
                h = r + (d * uu)[:, None] * Bt[None, :]
                tl.store(p_dC, tl.sum(dyt[:, None] * h, axis=0), mask=mn)
                p_r += EN
                p_dC += N
            tl.debug_barrier()  # the reverse loop reads back what the forward loop wrote

            # Reverse: g[t] = dy[t] C[t] + exp(delta[t+1] A) g[t+1], the carried gradient at the
            # chunk's last token. The decay's gradient is g[t] r[t].
            gn = carry  # exp(delta[t+1] A) g[t+1]
            last = t1 - 1
            p_d, p_u, p_g = delta_ptr + seq + last * E, u_ptr + seq + last * E, dy_ptr + seq + last * E
            p_B, p_C, p_r = B_ptr + bc + last * N, C_ptr + bc + last * N, work + (last - t0) * E * N
            p_du, p_dd, p_dB = du_ptr + seq + last * E, ddelta_ptr + seq + last * E, dB_ptr + part + last * N
            d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
            u_n = tl.load(p_u, mask=me, other=0.0).to(tl.float32)
            g_n = tl.load(p_g, mask=me, other=0.0).to(tl.float32)
            B_n = tl.load(p_B, mask=mn, other=0.0).to(tl.float32)
            C_n = tl.load(p_C, mask=mn, other=0.0).to(tl.float32)
            r_n = tl.load(p_r, mask=m2, other=0.0)
            span = last - t0
            for i in range(t1 - t0):
                d, uu, dyt, Bt, Ct, r = d_n, u_n, g_n, B_n, C_n, r_n
                more = i < span
                se, sn, sr = tl.where(more, E, 0), tl.where(more, N, 0), tl.where(more, EN, 0)
                p_d, p_u, p_g, p_B, p_C, p_r = p_d - se, p_u - se, p_g - se, p_B - sn, p_C - sn, p_r - sr
                d_n = tl.load(p_d, mask=me, other=0.0).to(tl.float32)
                u_n = tl.load(p_u, mask=me, other=0.0).to(tl.float32)
                g_n = tl.load(p_g, mask=me, other=0.0).to(tl.float32)
                B_n = tl.load(p_B, mask=mn, other=0.0).to(tl.float32)
                C_n = tl.load(p_C, mask=mn, other=0.0).to(tl.float32)
                r_n = tl.load(p_r, mask=m2, other=0.0)
                g = dyt[:, None] * Ct[None, :] + gn
                R = g * r  # gradient of delta[t] * A
                gB = tl.sum(g * Bt[None, :], axis=1)  # (BLOCK_E,)
                dA_acc += d[:, None] * R
                tl.store(p_dd, tl.sum(A * R, axis=1) + gB * uu, mask=me)
                du = gB * d
                if HAS_D:
                    du += Dv * dyt
                tl.store(p_du, du, mask=me)
                tl.store(p_dB, tl.sum(g * (d * uu)[:, None], axis=0), mask=mn)
                p_dd, p_du, p_dB = p_dd - E, p_du - E, p_dB - N
                gn = tl.exp(d[:, None] * A) * g
            carry = gn  # gradient on the state entering this chunk = on the previous chunk's last
            tl.debug_barrier()  # the next chunk's forward loop overwrites the scratch
        tl.store(dA_ptr + (b * n_seg + seg) * E * N + tile, dA_acc, mask=m2)


@dataclass(frozen=True)
class _Plan:
    """Launch parameters of one call (what _plan chose, or what a test forced)."""

    chunk: int  # T: tokens between saved states
    chunks_per_segment: int  # chunks one program walks in sequence
    block_e: int  # channels per program
    block_n: int  # states per program: all N, rounded up to a power of two
    num_warps: int


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _plan(
    u: torch.Tensor,
    n_state: int,
    chunk: int = CHUNK,
    chunks_per_segment: int | None = None,
    block_e: int | None = None,
) -> _Plan:
    batch, length, inner = u.shape
    gpu = u.is_cuda and not _interpreted()
    # The interpreter runs programs one after another at a fixed cost per operation: one program
    # per sequence (all channels, one segment) is the fastest there. A GPU wants many programs.
    block_e = block_e or min(MAX_BLOCK_E if gpu else 128, max(2, triton.next_power_of_2(inner)))
    block_n = max(2, triton.next_power_of_2(n_state))
    n_chunks = triton.cdiv(length, chunk)
    if chunks_per_segment is None:
        chunks_per_segment = n_chunks
        if gpu:
            # Split the sequence until the grid has PROGRAMS_PER_SM programs per SM: a segment
            # costs one more pass over its tokens (forward and backward), so only where needed.
            programs = batch * triton.cdiv(inner, block_e)
            target = PROGRAMS_PER_SM * _sm_count(u.device.index or 0)
            segments = min(n_chunks, triton.cdiv(target, programs))
            chunks_per_segment = triton.cdiv(n_chunks, segments)
    num_warps = 1 if block_e * block_n <= 256 else 2 if block_e * block_n <= 1024 else 4
    return _Plan(chunk, max(1, chunks_per_segment), block_e, block_n, num_warps)


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, plan: _Plan):
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D = None if D is None else D.contiguous()
        batch, length, inner = u.shape
        n_state = A.shape[1]
        T, K = plan.chunk, plan.chunks_per_segment
        n_chunks = triton.cdiv(length, T)
        n_seg = triton.cdiv(n_chunks, K)
        n_eblk = triton.cdiv(inner, plan.block_e)
        blocks = dict(BLOCK_E=plan.block_e, BLOCK_N=plan.block_n, num_warps=plan.num_warps)
        f32 = dict(device=u.device, dtype=torch.float32)

        if n_seg > 1:
            end = torch.empty(batch, n_seg, inner, n_state, **f32)
            decay = torch.empty_like(end)
            _fwd_local_kernel[(n_eblk, n_seg, batch)](
                u, delta, A, B, end, decay, length, inner, n_state, K * T, n_seg, **blocks
            )
            enter = torch.empty_like(end)
            _carry_kernel[(n_eblk, batch)](
                end, decay, end, enter, inner, n_state, n_seg, REVERSE=False, HAS_INIT=False, **blocks
            )
        else:
            enter = torch.zeros(batch, 1, inner, n_state, **f32)
        save = any(ctx.needs_input_grad[:6])
        saved = torch.empty(batch, n_chunks, inner, n_state, **f32) if save else enter
        y = torch.empty_like(u)
        final = torch.empty(batch, inner, n_state, **f32)
        _fwd_kernel[(n_eblk, n_seg, batch)](
            u, delta, A, B, C, u if D is None else D, y, enter, saved, final,
            length, inner, n_state, T, K, n_seg, n_chunks,
            HAS_D=D is not None, SAVE=save, **blocks,
        )  # fmt: skip
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, saved)
            ctx.plan = plan
        return y, final.to(u.dtype)

    @staticmethod
    def backward(ctx, dy, dfinal):
        u, delta, A, B, C, D, saved = ctx.saved_tensors
        plan = ctx.plan
        batch, length, inner = u.shape
        n_state = A.shape[1]
        T, K = plan.chunk, plan.chunks_per_segment
        n_chunks = triton.cdiv(length, T)
        n_seg = triton.cdiv(n_chunks, K)
        n_eblk = triton.cdiv(inner, plan.block_e)
        blocks = dict(BLOCK_E=plan.block_e, BLOCK_N=plan.block_n, num_warps=plan.num_warps)
        f32 = dict(device=u.device, dtype=torch.float32)
        dy = torch.zeros_like(u) if dy is None else dy.contiguous()
        dfinal = torch.zeros(batch, inner, n_state, **f32) if dfinal is None else dfinal.float().contiguous()

        if n_seg > 1:
            w = torch.empty(batch, n_seg, inner, n_state, **f32)
            decay = torch.empty_like(w)
            _bwd_local_kernel[(n_eblk, n_seg, batch)](
                delta, A, C, dy, w, decay, length, inner, n_state, K * T, n_seg, **blocks
            )
            carry = torch.empty_like(w)
            _carry_kernel[(n_eblk, batch)](
                w, decay, dfinal, carry, inner, n_state, n_seg, REVERSE=True, HAS_INIT=True, **blocks
            )
        else:
            carry = dfinal.reshape(batch, 1, inner, n_state)
        du = torch.empty(batch, length, inner, **f32)
        ddelta = torch.empty_like(du)
        dA = torch.empty(batch, n_seg, inner, n_state, **f32)
        work = torch.empty(batch, n_seg, T, inner, n_state, **f32)  # per-program chunk scratch
        dB = torch.empty(n_eblk, batch, length, n_state, **f32)
        dC = torch.empty_like(dB)
        _bwd_kernel[(n_eblk, n_seg, batch)](
            u, delta, A, B, C, u if D is None else D, dy, saved, carry, work,
            du, ddelta, dA, dB, dC,
            length, inner, n_state, T, K, n_seg, n_chunks, batch,
            HAS_D=D is not None, **blocks,
        )  # fmt: skip
        # Partial sums added in a fixed order: deterministic, unlike atomics.
        grads = [du.to(u.dtype), ddelta.to(delta.dtype), dA.sum((0, 1)).to(A.dtype)]
        grads += [dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype)]
        grads.append(None if D is None else (dy.float() * u.float()).sum((0, 1)).to(D.dtype))
        return (*grads, None)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(u, delta, A, B, C, D) -> None:
    if triton is None:
        raise RuntimeError(
            f"the Triton scan needs the triton package, which is not installed; {INSTALL_HINT}"
        )
    if not u.is_cuda and not _interpreted():
        raise RuntimeError(
            "the Triton scan needs CUDA tensors; on a CPU it runs only under Triton's interpreter, "
            "with TRITON_INTERPRET=1 set before model.scan_triton is imported (slow: tests only). "
            "Use scan='chunked' on a CPU."
        )
    named = dict(u=u, delta=delta, A=A, B=B, C=C) | ({} if D is None else dict(D=D))
    for name, t in named.items():
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"the Triton scan computes in float32 and takes float32, float16 or bfloat16 inputs; "
                f"{name} is {t.dtype}. For float64 use scan='reference' or 'chunked'."
            )
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, L, E); got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, length, inner = u.shape
    if A.dim() != 2 or A.shape[0] != inner:
        raise ValueError(f"A must be (E, N) with E = {inner}; got {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, length, n_state):
            raise ValueError(f"{name} must be (B, L, N) = {(batch, length, n_state)}; got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (inner,):
        raise ValueError(f"D must be (E,) = ({inner},); got {tuple(D.shape)}")
    if length == 0 or batch == 0:
        raise ValueError("the Triton scan needs at least one token and one sequence")


def _scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    chunk: int = CHUNK,
    chunks_per_segment: int | None = None,
    block_e: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y and the final state, with the launch parameters open (tests force several segments)."""
    _check(u, delta, A, B, C, D)
    plan = _plan(u, A.shape[1], chunk, chunks_per_segment, block_e)
    return _SelectiveScanFn.apply(u, delta, A, B, C, D, plan)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """Selective scan in Triton kernels, with a Triton backward. Same contract as
    ``model.scan.selective_scan_ref``; float64 is refused (see the module docstring).

    Args:
        u, delta: (B, L, E). A: (E, N). B, C: (B, L, N). D: (E,) or None.
        return_final_state: also return h[L-1], (B, E, N).
    Returns:
        y (B, L, E) in u's dtype, and the final state in u's dtype when asked for.
    Raises:
        RuntimeError: Triton is not installed, or the tensors are not on CUDA and the kernels are
            not interpreted.
    """
    y, final = _scan(u, delta, A, B, C, D)
    return (y, final) if return_final_state else y


def compile_kernels(arch: int = 90) -> list[str]:
    """Compile every kernel ahead of time for CUDA compute capability ``arch`` (90: H100/H200), for
    float32 and bfloat16 inputs, without a GPU (Triton ships its own ptxas). The interpreter does not
    type-check like the compiler does: this catches what only a GPU run would. Needs the kernels
    decorated outside the interpreter (TRITON_INTERPRET unset). Returns the variants compiled.
    """
    import inspect

    from triton.backends.compiler import GPUTarget  # Triton's compiler API: used here only
    from triton.compiler import ASTSource

    if triton is None or _interpreted():
        raise RuntimeError(f"compile_kernels needs triton ({INSTALL_HINT}) and TRITON_INTERPRET unset")
    inputs = {"u_ptr", "delta_ptr", "B_ptr", "C_ptr", "dy_ptr", "y_ptr"}  # in the caller's dtype
    blocks = dict(BLOCK_E=MAX_BLOCK_E, BLOCK_N=16)
    variants = [
        (_fwd_local_kernel, {}),
        (_carry_kernel, dict(REVERSE=False, HAS_INIT=False)),
        (_carry_kernel, dict(REVERSE=True, HAS_INIT=True)),
        (_fwd_kernel, dict(HAS_D=True, SAVE=True)),
        (_fwd_kernel, dict(HAS_D=False, SAVE=False)),
        (_bwd_local_kernel, {}),
        (_bwd_kernel, dict(HAS_D=True)),
        (_bwd_kernel, dict(HAS_D=False)),
    ]
    done = []
    for dtype in ("fp32", "bf16"):
        for kernel, flags in variants:
            constexprs = flags | blocks

            def kind(name, dtype=dtype, constexprs=constexprs):
                if name in constexprs:
                    return "constexpr"
                if name.endswith("_ptr"):
                    return f"*{dtype}" if name in inputs else "*fp32"
                return "i32"

            signature = {name: kind(name) for name in inspect.signature(kernel.fn).parameters}
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=1))
            done.append(f"{kernel.fn.__name__}{flags} {dtype}")
    return done
