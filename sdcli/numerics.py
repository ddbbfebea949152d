"""Numerics: how far an attention output is from the truth, and how far it may be.

The truth is exact attention in a wide dtype (fp64 for fp32 inputs, else fp32). What rounding alone costs
is plain attention computed in the inputs' own dtype. An exact kernel may err at most EXACT_TOL times as
much as that rounding; a quantized kernel may be off by at most QUANTIZED_TOL relative error. `sdcli
compare`, `auto`'s measured plan and the kernel micro-benchmarks all judge by these functions.
"""

from __future__ import annotations

from sdcli import backends

EXACT_TOL = 2.0       # an exact kernel may round at most this × as much as plain attention in its dtype
QUANTIZED_TOL = 0.1   # a quantized kernel may be off by at most this relative L2 error

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


def reference_attention(q, k, v, mask=None, scale=None):
    """Exact attention in a wide dtype (fp64 for fp32 inputs, else fp32): the kernel-level reference."""
    import torch

    wide = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32
    q, k, v = (t.to(wide) for t in (q, k, v))
    mask = mask.to(wide) if mask is not None and mask.dtype != torch.bool else mask
    return backends.get("sdpa-math").run(q, k, v, attn_mask=mask, scale=scale)


def plain_attention(q, k, v, mask=None, scale=None):
    """Attention as plain matmuls in the tensors' own dtype (softmax in fp32): what rounding alone costs."""
    import torch

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v).transpose(1, 2)


def relative_error(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def baseline(q, k, v, mask=None, scale=None) -> tuple:
    """What every backend at these inputs is judged against: exact attention, and the relative error of plain
    attention in q's dtype (rounding alone). It depends on the inputs only: compute it once per layer."""
    exact = reference_attention(q, k, v, mask, scale)
    return exact, relative_error(plain_attention(q, k, v, mask, scale), exact)


def accuracy(out, q, k, v, mask=None, scale=None, base: tuple | None = None) -> dict:
    """Error against exact attention, and that error over the rounding of plain attention in q's dtype."""
    import torch

    exact, rounding = base or baseline(q, k, v, mask, scale)
    err = relative_error(out, exact)
    return {"rel_error": err, "rounding": rounding, "ratio": err / max(rounding, 1e-12),
            "finite": bool(torch.isfinite(out).all())}


def within_bound(kind: str, acc: dict, exact_tol: float = EXACT_TOL, quantized_tol: float = QUANTIZED_TOL) -> bool:
    """An exact kernel may round at most `exact_tol`× as much as plain attention; a quantized one may be off by
    at most `quantized_tol` relative error (see sdcli compare)."""
    if not acc["finite"]:
        return False
    return acc["ratio"] <= exact_tol if kind == backends.EXACT else acc["rel_error"] <= quantized_tol
