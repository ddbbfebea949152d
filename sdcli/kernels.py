"""Attention kernels sdcli calls itself, where diffusers' dispatcher has no name for them.

Each is a backend's `attention` function (see backends.Backend): q, k, v laid out (batch, seq, heads, head_dim),
the output in the same layout. None takes a mask (their checks refuse masked shapes); a mask that gets here anyway
is an error, which the router reports like any kernel's. torch and the kernel packages are imported at the first
call, so that declaring the backends costs nothing.
"""

from __future__ import annotations

import os
import types

# FlashAttention-4 compiles its kernels at their first call in every new process unless its disk cache is on
# (flash_attn/cute/cache_utils.py, 4.0.0b36: off unless this is "1"; the cache lives in
# $FLASH_ATTENTION_CUTE_DSL_CACHE_DIR, default /tmp/$USER/flash_attention_cute_dsl_cache).
FA4_DISK_CACHE = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


def fa4_disk_cache() -> None:
    """Turn FlashAttention-4's disk cache on, unless the user set it. It is read once, when flash_attn.cute is first
    imported: call this before that (hardware.probe does, and the kernels below)."""
    os.environ.setdefault(FA4_DISK_CACHE, "1")


def _no_mask(attn_mask, kernel: str) -> None:
    if attn_mask is not None:
        raise ValueError(f"{kernel} takes no attention mask")


def flash_attn_4(q, k, v, attn_mask=None, scale=None):
    """FlashAttention-4 (`flash-attn-4`, CuTe DSL): the package's own function, compiled at its first call per
    shape. It takes our layout as it is."""
    fa4_disk_cache()
    from flash_attn.cute import flash_attn_func

    _no_mask(attn_mask, "FlashAttention-4")
    out = flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # 4.0.0b36 returns (out, lse)


def sdpa_fa4(q, k, v, attn_mask=None, scale=None):
    """SDPA's flash kernel with torch's FlashAttention-4 implementation activated for this call only. Activation
    registers FA4 in torch's dispatcher for SDPA's flash op; the implementation active before (usually none:
    torch's own FA2) is put back after the call, so `sdpa-flash` in the same run stays FA2."""
    import torch
    from torch.nn import attention

    _no_mask(attn_mask, "SDPA with FlashAttention-4")
    fa4_disk_cache()  # torch's bridge imports flash_attn.cute.interface
    before = attention.current_flash_attention_impl()
    if before != "FA4":
        attention.activate_flash_attention_impl("FA4")
    try:
        # Only the flash kernel: torch would otherwise be free to pick cuDNN or efficient, and FA4 would not run.
        with attention.sdpa_kernel(attention.SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    finally:
        if before is None:
            attention.restore_flash_attention_impl()
        elif before != "FA4":
            attention.activate_flash_attention_impl(before)
    return out.transpose(1, 2)


def sage1(q, k, v, attn_mask=None, scale=None):
    """SageAttention 1.0.6 (Triton): INT8 QK per block, fp16 PV. diffusers' `sage` names need 2.1.1, so it is
    called directly, in its "NHD" layout, which is ours."""
    from sageattention import sageattn

    _no_mask(attn_mask, "SageAttention 1")
    # sageattn's smooth_k subtracts the keys' mean in place (k -= km); done here out of place instead, so the
    # caller's k (a replayed capture in `sdcli compare`) is left as it was.
    k = k - k.mean(dim=1, keepdim=True)
    return sageattn(q, k, v, tensor_layout="NHD", sm_scale=scale, smooth_k=False)


# One compiled function per shape. dynamo keeps compiled versions per code object and, past
# torch._dynamo.config.recompile_limit (8) shapes, silently runs flex_attention eagerly (unfused) instead: seen on
# the CPU at the 9th shape, 0.2 ms -> 56 ms. A fresh code object per shape gives each its own cache.
# The batch is not part of the shape: auto and bench judge a kernel at batch 1 and time it at the run's batch, and a
# compile per batch size would pay each shape's compile twice. It is marked unbacked, not merely dynamic: dynamo
# specialises a dynamic size of 1 and would compile again at the first larger batch (checked on the CPU, torch 2.13:
# batch 1, 2, 4, 1 made one graph unbacked, two merely dynamic).
_compiled_flex: dict[tuple, object] = {}


def _flex(q, k, v, scale):
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    # the three batch sizes are one: said so, flex_attention's own check of it is no graph break (unbacked sizes)
    torch._check(k.size(0) == q.size(0))
    torch._check(v.size(0) == q.size(0))
    return flex_attention(q, k, v, scale=scale)


def flex_compiled(q, k, v, attn_mask=None, scale=None):
    """flex_attention compiled by torch.compile, once per shape whatever the batch (the first call pays the
    compile)."""
    import torch
    from torch._dynamo.decorators import mark_unbacked

    _no_mask(attn_mask, "compiled flex_attention")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    key = (q.shape[1:], k.shape[1:], q.dtype, q.device, scale)
    fn = _compiled_flex.get(key)
    if fn is None:
        fresh = types.FunctionType(_flex.__code__.replace(), _flex.__globals__, f"flex_{len(_compiled_flex)}")
        fn = _compiled_flex[key] = torch.compile(fresh, dynamic=False)
    if not torch.compiler.is_compiling():  # inside a caller's graph the tensors are the graph's, not inputs
        for t in (q, k, v):
            mark_unbacked(t, 0)
    return fn(q, k, v, scale).transpose(1, 2)
