"""Planted faults: attention kernels that are wrong in small, realistic ways, shipped as a plug-in the way a
kernel author ships one (entry-point group `sdcli.backends`). Every one of them must fail `sdcli compare`'s
bound for exact kernels, in fp32, fp16 and bf16; scripts/calibrate_bound.py measures them against correct
kernels (docs/bound.md), and tests/test_bound.py installs this file as a plug-in."""

import torch

from sdcli.backends import Backend


def attention(q, k, v, attn_mask=None, scale=None):
    """Correct attention in the (batch, seq, heads, head_dim) layout, the base every fault starts from."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


def scale_off(factor):
    def wrong_scale(q, k, v, attn_mask=None, scale=None):
        return attention(q, k, v, attn_mask, (scale or q.shape[-1] ** -0.5) * factor)

    return wrong_scale


def last_key_dropped(q, k, v, attn_mask=None, scale=None):
    mask = attn_mask[..., :-1] if attn_mask is not None else None
    return attention(q, k[:, :-1], v[:, :-1], mask, scale)


def output_biased(q, k, v, attn_mask=None, scale=None):
    return attention(q, k, v, attn_mask, scale) * 1.004  # 0.4 % too large


def keys_shuffled(q, k, v, attn_mask=None, scale=None):
    order = torch.randperm(k.shape[1], generator=torch.Generator().manual_seed(0)).to(k.device)
    return attention(q, k[:, order], v, attn_mask, scale)  # keys no longer line up with their values


backends = [
    Backend("scale-x1.01", "softmax scale 1% too large", attention=scale_off(1.01)),
    Backend("scale-x1.02", "softmax scale 2% too large", attention=scale_off(1.02)),
    Backend("last-key-dropped", "the last key and value left out", attention=last_key_dropped),
    Backend("bias-0.4pct", "output 0.4% too large", attention=output_biased),
    Backend("keys-shuffled", "keys out of line with their values", attention=keys_shuffled),
]
