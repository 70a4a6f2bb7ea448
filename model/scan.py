"""The selective scan of Mamba, in several forms with one signature.

Equations (per batch b, channel e, state n; Mamba paper, eq. 2a/2b with zero-order-hold A and Euler B):

    h[t] = exp(delta[t, e] * A[e, n]) * h[t-1] + delta[t, e] * B[t, n] * u[t, e]
    y[t, e] = sum_n C[t, n] * h[t, e, n] + D[e] * u[t, e]

Forms:
- ``selective_scan_ref``: a loop over t written straight from the equations. The ground truth.
- ``selective_scan_chunked``: the export path and the fallback everywhere. Splits L into chunks of
  T tokens; within a chunk the prefix sums are products with a T x T lower-triangular matrix, and
  the states entering each chunk come from the same algorithm applied to the chunk summaries
  (recursively, so the graph has O(log_T L) levels and no loop). Exports to MatMul/Exp/Mul/Reshape
  only: no Loop, Scan or CumSum. Memory-bound: it materialises (L, E, N) tensors.
- ``selective_scan_fused``: a compiled CPU kernel (model/csrc/selective_scan_cpu.cpp, built at first
  use by model/cpu_kernel.py), forward and backward; the state stays in L1, nothing of size
  (L, E, N) is written, the backward pass recomputes from states saved every FUSED_SEGMENT tokens.
- ``selective_scan_triton`` (model/scan_triton.py): the same design as a Triton kernel, for CUDA.
- ``selective_scan_cuda``: the ``mamba-ssm`` CUDA kernel, used only when it is installed and the
  tensors are on CUDA.
``selective_scan(impl="auto")`` picks triton on CUDA, fused on the CPU, chunked where neither runs
(``resolve_scan``). Exported ONNX graphs always use the chunked form (model/export.py).

All forms take u, delta (B, L, E); A (E, N); B, C (B, L, N); D (E,) or None, and return y (B, L, E)
and, with ``return_final_state``, the last state h[L-1] (B, E, N). Like the CUDA kernel, the
recurrence is computed in at least float32 (float16/bfloat16 inputs are upcast, float64 stays).

Numerical safety of the chunked form. Within a chunk it writes exp(S[t] - S[s]) as
exp(S[t] - R) * exp(R - S[s]), with S the running sum of log-decays and R its value at the middle
of the chunk, so each factor has an exponent of at most (T/2) * (largest per-step log-decay). To
bound that, the per-step log-decay delta * A (and a chunk's summed log-decay, one level up) is
floored at -K with K = EXP_LIMIT / max(T/2, 1): no exponent exceeds EXP_LIMIT, 64 in float32
(exp(64) = 6e27, far from float32's 3.4e38) and 640 in float64. With the default T = 8, K = 16 in
float32: a decay floor of 1.1e-7, below float32 resolution relative to the state it multiplies.
Departure from the reference: a state that decays by more than exp(-K) in one step (or over one
chunk) keeps exp(-K) of itself instead of less; tests bound that difference. T is at most
MAX_CHUNK = 8: larger chunks would lower K to where the floor is visible in float32.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import MAX_CHUNK, SCAN_FORMS  # noqa: F401 (defined without torch, used here)

EXP_LIMIT = {torch.float32: 64.0, torch.float64: 640.0}  # largest exponent the chunked form forms

log = logging.getLogger(__name__)

ScanResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def log_decay_floor(dtype: torch.dtype, chunk_size: int) -> float:
    """K: the chunked form floors log-decays at -K so that no exponent exceeds EXP_LIMIT."""
    return EXP_LIMIT[_compute_dtype(dtype)] / max(chunk_size / 2, 1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """Sequential selective scan, one token at a time. Slow; the reference for tests."""
    out_dtype = u.dtype
    ct = _compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    batch, length, inner = u.shape
    h = u.new_zeros(batch, inner, A.shape[1])  # (B, E, N)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, None] * A)  # (B, E, N)
        h = decay * h + (delta[:, t, :, None] * u[:, t, :, None]) * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))  # (B, E)
    y = torch.stack(ys, dim=1)  # (B, L, E)
    if D is not None:
        y = y + u * D.to(ct)
    y = y.to(out_dtype)
    return (y, h.to(out_dtype)) if return_final_state else y


def _chunk_states(log_decay: torch.Tensor, x: torch.Tensor, chunk: int, floor: float) -> torch.Tensor:
    """All states of h[t] = exp(log_decay[t]) * h[t-1] + x[t], h[-1] = 0.

    Args:
        log_decay: (B, L, F) per-step log-decays, in [-floor, 0]; F = E * N flattened.
        x: (B, L, F) inputs.
        chunk: T, the chunk length.
        floor: K, see log_decay_floor.
    Returns:
        (B, L, F) states.
    """
    batch, length, feat = x.shape
    pad = (-length) % chunk
    if pad:  # trailing padding with decay 1 and input 0 leaves the earlier states untouched
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
        x = F.pad(x, (0, 0, 0, pad))
    n_chunks = (length + pad) // chunk
    log_decay = log_decay.reshape(batch, n_chunks, chunk, feat)
    x = x.reshape(batch, n_chunks, chunk, feat)

    tril = torch.ones(chunk, chunk, dtype=x.dtype, device=x.device).tril()  # (T, T)
    S = tril @ log_decay  # (B, c, T, F) running log-decay within each chunk, S[t] = sum_{j<=t}
    mid = chunk // 2 - 1 if chunk > 1 else 0
    R = S[:, :, mid : mid + 1]  # (B, c, 1, F)
    shrink = torch.exp(R - S)  # exp(R - S[s]), exponent <= EXP_LIMIT
    grow = torch.exp(S - R)  # exp(S[t] - R), the same bound (not 1/shrink: its gradient squares the range)
    # acc[t] = sum_{s<=t} exp(R - S[s]) x[s]: the in-chunk sums as one (T x T) matmul
    acc = tril @ (shrink * x)  # (B, c, T, F)

    if n_chunks == 1:
        return (grow * acc).reshape(batch, -1, feat)[:, :length]
    # States at chunk ends obey the same recurrence over chunks, with decay exp(S[T-1]).
    # Clamping the summed decay keeps the floor invariant at the next level.
    local_ends = grow[:, :, -1] * acc[:, :, -1]  # (B, c, F) chunk-end states from the chunk's own inputs
    ends = _chunk_states(S[:, :, -1].clamp(min=-floor), local_ends, chunk, floor)
    entering = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)  # (B, c, F)
    # h[t] = exp(S[t] - R) * (acc[t] + exp(R) * entering) = local part + exp(S[t]) * entering
    h = grow * (acc + torch.exp(R) * entering[:, :, None])  # (B, c, T, F)
    return h.reshape(batch, -1, feat)[:, :length]


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = MAX_CHUNK,
) -> ScanResult:
    """Chunked selective scan (see the module docstring). Same contract as ``selective_scan_ref``."""
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(
            f"chunk_size must be between 1 and {MAX_CHUNK} (got {chunk_size}): larger chunks can "
            "overflow exp() in float32; see model/scan.py"
        )
    batch = u.shape[0]
    if u.device.type == "cpu" and batch > 1:
        # One sample at a time on the CPU: the (L, E, N) temporaries of one sample stay below
        # glibc's mmap threshold and are reused; batched, they are mmapped and page-faulted anew
        # on every call (2-2.5x slower at batch 8, docs/benchmarks.md). Exported graphs have batch 1.
        outs = [
            _chunked_one(u[i : i + 1], delta[i : i + 1], A, B[i : i + 1], C[i : i + 1], D, chunk_size)
            for i in range(batch)
        ]
        y, h_last = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    else:
        y, h_last = _chunked_one(u, delta, A, B, C, D, chunk_size)
    return (y, h_last) if return_final_state else y


def _chunked_one(u, delta, A, B, C, D, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = u.dtype
    ct = _compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    batch, length, inner = u.shape
    n_state = A.shape[1]
    floor = log_decay_floor(ct, chunk_size)
    log_decay = (delta[..., None] * A).clamp(min=-floor)  # (B, L, E, N)
    x = (delta * u)[..., None] * B[:, :, None, :]  # (B, L, E, N)
    h = _chunk_states(
        log_decay.reshape(batch, length, inner * n_state),
        x.reshape(batch, length, inner * n_state),
        chunk_size,
        floor,
    ).reshape(batch, length, inner, n_state)
    y = (h @ C[..., None]).squeeze(-1)  # (B, L, E)
    if D is not None:
        y = y + u * D.to(ct)
    return y.to(out_dtype), h[:, -1].to(out_dtype)


FUSED_SEGMENT = 32  # K: the fused CPU kernel saves the state entering every K tokens for backward


def _fused_forward(u, delta, A, B, C, D, save_states: bool):
    """Run the CPU kernel's forward on contiguous tensors of one dtype (float32 or float64)."""
    from model.cpu_kernel import call

    batch, length, inner = u.shape
    n_state = A.shape[1]
    y = torch.empty_like(u)
    h_last = u.new_empty(batch, inner, n_state)
    n_seg = -(-length // FUSED_SEGMENT)
    ckpt = u.new_empty(batch, n_seg, n_state, inner) if save_states else None
    call("ss_forward", u, delta, A, B, C, D, y, h_last, ckpt, batch, length, inner, n_state, FUSED_SEGMENT)
    return y, h_last, ckpt


class _FusedScan(torch.autograd.Function):
    """The CPU kernel as an autograd function; inputs are contiguous and of one float dtype."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D):
        y, h_last, ckpt = _fused_forward(u, delta, A, B, C, D, save_states=True)
        ctx.save_for_backward(u, delta, A, B, C, D, ckpt)
        ctx.has_D = D is not None
        return y, h_last

    @staticmethod
    def backward(ctx, dy, dh_last):
        from model.cpu_kernel import call, kernel

        u, delta, A, B, C, D, ckpt = ctx.saved_tensors
        batch, length, inner = u.shape
        n_state = A.shape[1]
        dy = torch.zeros_like(u) if dy is None else dy.to(u.dtype).contiguous()
        dh_last = None if dh_last is None else dh_last.to(u.dtype).contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA, dB, dC = torch.empty_like(A), torch.empty_like(B), torch.empty_like(C)
        dD = torch.empty_like(D) if ctx.has_D else None
        lib = kernel()
        scratch_fn = lib.ss_backward_scratch_f64 if u.dtype == torch.float64 else lib.ss_backward_scratch_f32
        scratch = u.new_empty(scratch_fn(batch, length, inner, n_state))
        grads = (du, ddelta, dA, dB, dC, dD)
        tensors = (u, delta, A, B, C, D, ckpt, dy, dh_last, *grads, scratch)
        call("ss_backward", *tensors, batch, length, inner, n_state, FUSED_SEGMENT)
        return grads


def fused_available() -> bool:
    """True when the fused CPU kernel is built (or builds now) and loads in this process."""
    from model.cpu_kernel import kernel

    return kernel() is not None


def selective_scan_fused(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """The fused CPU kernel (model/csrc/selective_scan_cpu.cpp). Same contract as ``selective_scan_ref``.

    Keeps the state in a per-thread buffer, never writes (L, E, N) tensors, and saves only the state
    entering every FUSED_SEGMENT tokens for the backward pass. Where the kernel cannot be built (no
    compiler: one warning, see model/cpu_kernel.py) or the tensors are not on the CPU, the chunked
    form runs instead.
    """
    from model.cpu_kernel import kernel

    lib = kernel() if u.device.type == "cpu" else None
    if lib is None:
        return selective_scan_chunked(u, delta, A, B, C, D, return_final_state)
    out_dtype = u.dtype
    ct = _compute_dtype(u.dtype)
    args = [t.to(ct).contiguous() for t in (u, delta, A, B, C)]
    Dc = None if D is None else D.to(ct).contiguous()
    tracked = (u, delta, A, B, C) + (() if D is None else (D,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        y, h_last = _FusedScan.apply(*args, Dc)
    else:
        y, h_last, _ = _fused_forward(*args, Dc, save_states=False)
    y = y.to(out_dtype)
    return (y, h_last.to(out_dtype)) if return_final_state else y


@functools.cache
def _mamba_ssm_fn():
    """The mamba-ssm kernel's Python entry point, or None when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, or a CUDA-less build failing at import time
        log.info("mamba-ssm is not usable here (%s); using the chunked scan", exc)
        return None
    return selective_scan_fn


def mamba_ssm_available() -> bool:
    """True when the mamba-ssm CUDA kernel can be imported (install with the ``gpu`` extra)."""
    return _mamba_ssm_fn() is not None


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> ScanResult:
    """The mamba-ssm CUDA kernel behind the common signature (it wants channels-first tensors)."""
    fn = _mamba_ssm_fn()
    if fn is None or not u.is_cuda:
        raise RuntimeError(
            "the mamba-ssm scan needs CUDA tensors and the mamba-ssm package; install it with "
            "`pip install -e .[gpu]` on a CUDA machine, or use scan='chunked'"
        )
    out = fn(
        u.transpose(1, 2).contiguous(),
        delta.transpose(1, 2).contiguous(),
        A.float().contiguous(),
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        None if D is None else D.float(),
        return_last_state=return_final_state,
    )
    if return_final_state:
        y, last = out
        return y.transpose(1, 2), last
    return out.transpose(1, 2)


def resolve_scan(impl: str, device: torch.device | str) -> str:
    """The form that ``impl`` runs as on ``device``: what the training log and MLflow params report.

    "auto" is "triton" on CUDA where Triton imports, "fused" on the CPU where the kernel builds,
    "chunked" otherwise; "fused", "triton" and "mamba_ssm" fall back to "chunked" where they cannot run.
    """
    if impl not in SCAN_FORMS:
        raise ValueError(f"unknown scan {impl!r}; use one of {SCAN_FORMS}")
    kind = torch.device(device).type
    if impl == "auto":
        impl = "triton" if kind == "cuda" else "fused"
    if impl == "fused" and not (kind == "cpu" and fused_available()):
        return "chunked"
    if impl == "triton":
        from model.scan_triton import triton_available

        if not (kind == "cuda" and triton_available()):
            return "chunked"
    if impl == "mamba_ssm" and not (kind == "cuda" and mamba_ssm_available()):
        return "chunked"
    return impl


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = MAX_CHUNK,
) -> ScanResult:
    """Dispatch to one scan form.

    Args:
        impl: one of SCAN_FORMS; "auto" (default) and the kernels resolve as ``resolve_scan`` says.
        chunk_size: T for the chunked form, 1..MAX_CHUNK.
    """
    form = resolve_scan(impl, u.device)
    if form == "chunked":
        return selective_scan_chunked(u, delta, A, B, C, D, return_final_state, chunk_size)
    if form == "fused":
        return selective_scan_fused(u, delta, A, B, C, D, return_final_state)
    if form == "triton":
        from model.scan_triton import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, return_final_state)
    if form == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, return_final_state)
    return selective_scan_cuda(u, delta, A, B, C, D, return_final_state)


class SelectiveScan(torch.nn.Module):
    """The scan as a parameter-free module, so exported graphs can tell its nodes apart.

    model/export.py prefixes the ONNX nodes produced inside this module with ``fp32_scan/``: the
    chunked form's exponentials need float32 range, so a float16 engine must keep them in float32.

    The kernels (fused, triton, mamba_ssm) save only chunk-boundary states and recompute the rest in
    their own backward pass. In training, the chunked and reference forms are recomputed in the
    backward pass instead of keeping their (B, L, E, N) intermediates (activation checkpointing):
    about ten tensors of B x 4096 x E x N floats per layer would otherwise stay alive, which ran a
    2-core, 24 GiB machine out of memory for the teacher at batch 8.
    Reentrant checkpointing: the non-reentrant variant left the student's forward at 13 GB of
    resident memory at batch 8 here, against 1.6 GB reentrant (docs/benchmarks.md).
    """

    def __init__(self, impl: str = "auto", chunk_size: int = MAX_CHUNK):
        super().__init__()
        self.impl, self.chunk_size = impl, chunk_size

    def form(self, device: torch.device) -> str:
        """The form that runs on ``device`` (see ``resolve_scan``)."""
        return resolve_scan(self.impl, device)

    def forward(self, u, delta, A, B, C, D=None):
        form = self.form(u.device)

        def run(*args):
            return selective_scan(*args, impl=form, chunk_size=self.chunk_size)

        if self.training and torch.is_grad_enabled() and form in ("chunked", "reference"):
            return checkpoint(run, u, delta, A, B, C, D, use_reentrant=True)
        return run(u, delta, A, B, C, D)
