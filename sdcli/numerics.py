"""Numerics: what an attention kernel's output is judged against, and the bounds that tell right from wrong.

- exact: attention in a wide dtype (fp64 for fp32 runs, fp32 for fp16/bf16 runs), SDPA's math kernel.
- the unit, "rounding": the relative error of attention computed in fp32 and stored in the run's dtype. For
  fp16/bf16 that is the exact result rounded to the dtype, the least any kernel returning that dtype can err;
  for fp32 it is the error of fp32 arithmetic itself. A kernel's `ratio` is its error in this unit.
- an exact kernel passes at a ratio ≤ EXACT_TOL; a quantized one at a relative error ≤ QUANTIZED_TOL.

The calibration behind EXACT_TOL (correct kernels against planted faults, per dtype and SD shape) is
docs/bound.md, made by scripts/calibrate_bound.py. A kernel is judged on more than one call with different
inputs (`judge`), so one that is right once and then returns a stale buffer fails. `sdcli compare`, `auto`'s
measured plan and the kernel micro-benchmarks all judge by these functions, always in full fp32 (`full_fp32`:
no TF32, whatever the run allows), so the references are exact and the bound means what it was calibrated for.
"""

from __future__ import annotations

from contextlib import contextmanager

from sdcli.backends import EXACT

EXACT_TOL = 2.0       # correct kernels measured 0.96-1.45× rounding, planted faults ≥ 3.6× (docs/bound.md)
QUANTIZED_TOL = 0.1   # a quantized kernel may be off by at most this relative L2 error
LOGIT_STD = 2.0       # sampled test inputs: logits q·k/√d of this spread peak near ±10, like a trained model's

# The one map between sdcli's dtype names and torch's (by name, so that importing this module loads no torch).
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPES = tuple(TORCH_DTYPES)


def torch_dtype(name: str):
    """'fp16' -> torch.float16."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def dtype_name(dtype) -> str:
    """torch.float16 -> 'fp16' (any other dtype: torch's own name)."""
    short = str(dtype).removeprefix("torch.")
    return next((name for name, full in TORCH_DTYPES.items() if full == short), short)


@contextmanager
def full_fp32():
    """fp32 matmuls in full fp32 on CUDA while this lasts. With TF32 (`--tf32`, sdcli.speed) an fp32 matmul keeps
    10 mantissa bits, fp16's: the fp32 reference of an fp16 run would be no more exact than the kernels it
    judges, and an fp32 kernel would err far beyond fp32's rounding. The state is read through torch's newer
    API where it has one (reading the legacy flag raises once a program has used the newer API) and written
    through the legacy flag, which keeps both in step."""
    import torch

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def _math(q, k, v, mask=None):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(q, k, v, attn_mask=mask, backend="_native_math")


def reference_attention(q, k, v, mask=None):
    """Exact attention in a wide dtype (fp64 for fp32 inputs, else fp32): the kernel-level reference."""
    import torch

    wide = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32
    q, k, v = (t.to(wide) for t in (q, k, v))
    mask = mask.to(wide) if mask is not None and mask.dtype != torch.bool else mask
    return _math(q, k, v, mask)


def relative_error(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def baseline(q, k, v, mask=None) -> tuple:
    """What every backend at these inputs is judged against: exact attention, and the unit (the error of fp32
    attention stored in q's dtype). It depends on the inputs only: compute it once per layer."""
    import torch

    with full_fp32():
        exact = reference_attention(q, k, v, mask)
        if exact.dtype == torch.float32:  # fp16/bf16 inputs: the reference is the fp32 result
            fp32 = exact
        else:
            m = mask.float() if mask is not None and mask.dtype != torch.bool else mask
            fp32 = _math(q.float(), k.float(), v.float(), m)
    return exact, relative_error(fp32.to(q.dtype), exact)


def accuracy(out, q, k, v, mask=None, base: tuple | None = None) -> dict:
    """A kernel's error against exact attention, and that error in units of rounding (`ratio`)."""
    import torch

    exact, rounding = base or baseline(q, k, v, mask)
    if not torch.is_tensor(out) or out.shape != exact.shape:
        raise ValueError(f"the kernel returned {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}, "
                         f"not a tensor of shape {tuple(exact.shape)}")
    finite = bool(torch.isfinite(out).all())
    err = relative_error(out, exact) if finite else float("inf")
    return {"rel_error": err, "rounding": rounding, "ratio": err / max(rounding, 1e-30), "finite": finite}


def within_bound(kind: str, acc: dict, exact_tol: float = EXACT_TOL, quantized_tol: float = QUANTIZED_TOL) -> bool:
    """An exact kernel may err at most `exact_tol` × rounding; a quantized one at most `quantized_tol` relative
    error (see sdcli compare)."""
    if not acc["finite"]:
        return False
    return acc["ratio"] <= exact_tol if kind == EXACT else acc["rel_error"] <= quantized_tol


def bound_text(kind: str, acc: dict, exact_tol: float = EXACT_TOL, quantized_tol: float = QUANTIZED_TOL) -> str:
    """The measurement against its bound, in words: `error 3.62× rounding, bound 2×`."""
    if not acc["finite"]:
        return "non-finite output"
    if kind == EXACT:
        return f"error {acc['ratio']:.3g}× rounding, bound {exact_tol:g}×"
    return f"relative error {acc['rel_error']:.3g}, bound {quantized_tol:g}"


def sample_inputs(heads: int, head_dim: int, q_len: int, kv_len: int, dtype: str, device: str = "cpu",
                  batch: int = 1, seed: int = 0, logit_std: float = LOGIT_STD) -> tuple:
    """Random q, k, v in (batch, seq, heads, head_dim) with realistic magnitudes: logits of spread LOGIT_STD
    (unit normals would give logits of spread 1, far flatter than a trained model's attention)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sigma = logit_std ** 0.5  # q·k/√d of two N(0, σ²) vectors has spread σ²
    dt = torch_dtype(dtype)
    q = torch.randn(batch, q_len, heads, head_dim, generator=gen) * sigma
    k = torch.randn(batch, kv_len, heads, head_dim, generator=gen) * sigma
    v = torch.randn(batch, kv_len, heads, head_dim, generator=gen)
    return tuple(t.to(device, dt) for t in (q, k, v))


def sampled_call(shape, device="cpu", batch: int = 1, seed: int = 1) -> tuple:
    """One call's inputs (q, k, v, mask) at a Shape, sampled: what compare and auto's tuner judge besides a
    layer's captured inputs."""
    return (*sample_inputs(shape.heads, shape.head_dim, shape.q_len, shape.kv_len, shape.dtype, device, batch,
                           seed), None)


def judge(run, kind: str, calls: list[tuple], bases: list[tuple] | None = None, exact_tol: float = EXACT_TOL,
          quantized_tol: float = QUANTIZED_TOL) -> dict:
    """Run a kernel on each of `calls` (q, k, v, mask), in order, and keep its worst call. More than one
    call with different inputs, so a kernel that is right once and then returns a stale buffer fails. `bases`:
    each call's baseline, when several kernels are judged on the same calls. Returns the worst call's accuracy,
    `ok` and `why` (the measurement against its bound)."""
    import torch

    key = "ratio" if kind == EXACT else "rel_error"  # non-finite output counts as an infinite error
    worst = None
    for (q, k, v, mask), base in zip(calls, bases or [None] * len(calls)):
        with torch.inference_mode(), full_fp32():
            acc = accuracy(run(q, k, v, attn_mask=mask), q, k, v, mask, base)
        if worst is None or acc[key] > worst[key]:
            worst = acc
    return {**worst, "ok": within_bound(kind, worst, exact_tol, quantized_tol),
            "why": bound_text(kind, worst, exact_tol, quantized_tol), "calls_checked": len(calls)}
