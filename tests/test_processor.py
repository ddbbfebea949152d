"""Routing leaves diffusers' processors alone: for every branch of diffusers' `Attention`, routed through `sdpa` in
fp32 it gives the very same numbers as stock AttnProcessor2_0, and the routed call is the one that ran."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

from sdcli import backends, hardware, routing

B, S, KV, DIM, CROSS = 2, 12, 7, 32, 24


def inputs(seed=0, **shapes):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=gen) for name, shape in shapes.items()}


def routed_and_stock(attn: Attention, stock=None, **call):
    """(sdcli's output, diffusers' output) for one call; and that sdcli's routed `sdpa` call served it."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():  # non-trivial affine norms and biases
            p.add_(torch.randn(p.shape) * 0.1)
    attn.set_processor(stock or AttnProcessor2_0())
    with torch.no_grad():
        expected = attn(**call)
    router = routing.Router([backends.get("sdpa")], hardware.Machine({}, "cpu"), True, "sdpa")
    routing.route(attn, router)
    assert type(attn.processor) is type(stock or AttnProcessor2_0())  # the processor stays diffusers' own
    try:
        with torch.no_grad():
            got = attn(**call)
    finally:
        routing.unroute(attn)
    assert router.served() == {"sdpa": 1}
    return got, expected


def additive_mask():
    mask = torch.zeros(B, 1, KV)
    mask[0, :, -3:] = float("-inf")
    mask[1, :, :2] = -2.0
    return mask


def boolean_mask():
    mask = torch.ones(B, 1, KV, dtype=torch.bool)
    mask[0, :, -3:] = False
    return mask


CASES = {
    "self": (dict(query_dim=DIM, heads=2, dim_head=16), lambda: inputs(hidden_states=(B, S, DIM))),
    "cross": (dict(query_dim=DIM, cross_attention_dim=CROSS, heads=2, dim_head=16),
              lambda: inputs(hidden_states=(B, S, DIM), encoder_hidden_states=(B, KV, CROSS))),
    "norm_cross": (dict(query_dim=DIM, cross_attention_dim=CROSS, heads=2, dim_head=16,
                        cross_attention_norm="layer_norm"),
                   lambda: inputs(hidden_states=(B, S, DIM), encoder_hidden_states=(B, KV, CROSS))),
    "group_norm_residual_rescale": (dict(query_dim=DIM, heads=2, dim_head=16, norm_num_groups=8,
                                         residual_connection=True, rescale_output_factor=2.0),
                                    lambda: inputs(hidden_states=(B, S, DIM))),
    "vae_4d_input": (dict(query_dim=DIM, heads=1, dim_head=DIM, norm_num_groups=8, residual_connection=True,
                          rescale_output_factor=1.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True),
                     lambda: inputs(hidden_states=(B, DIM, 3, 4))),
    "spatial_norm": (dict(query_dim=DIM, heads=1, dim_head=DIM, spatial_norm_dim=4, residual_connection=True),
                     lambda: inputs(hidden_states=(B, DIM, 4, 4), temb=(B, 4, 2, 2))),
    "qk_layer_norm": (dict(query_dim=DIM, heads=2, dim_head=16, qk_norm="layer_norm"),
                      lambda: inputs(hidden_states=(B, S, DIM))),
    "qk_rms_norm": (dict(query_dim=DIM, heads=2, dim_head=16, qk_norm="rms_norm", eps=1e-6),
                    lambda: inputs(hidden_states=(B, S, DIM))),
    "out_dim": (dict(query_dim=DIM, heads=2, dim_head=16, out_dim=48), lambda: inputs(hidden_states=(B, S, DIM))),
    "additive_mask": (dict(query_dim=DIM, cross_attention_dim=CROSS, heads=2, dim_head=16),
                      lambda: {**inputs(hidden_states=(B, S, DIM), encoder_hidden_states=(B, KV, CROSS)),
                               "attention_mask": additive_mask()}),
    "boolean_mask": (dict(query_dim=DIM, cross_attention_dim=CROSS, heads=2, dim_head=16),
                     lambda: {**inputs(hidden_states=(B, S, DIM), encoder_hidden_states=(B, KV, CROSS)),
                              "attention_mask": boolean_mask()}),
    "scale_qk_false": (dict(query_dim=DIM, heads=2, dim_head=16, scale_qk=False),
                       lambda: inputs(hidden_states=(B, S, DIM))),
}


@pytest.mark.parametrize("case", CASES)
def test_routed_attention_equals_attn_processor_2_0(case):
    config, call = CASES[case]
    got, expected = routed_and_stock(Attention(**config), **call())
    assert got.shape == expected.shape and torch.equal(got, expected)


@pytest.mark.parametrize("case", ["self", "cross"])
def test_fused_projections_are_the_ones_used(case):
    """After diffusers' fuse_projections the routed module equals FusedAttnProcessor2_0. The fused weights are
    then changed, so only a processor that really uses to_qkv / to_kv can still match."""
    config, call = CASES[case]
    attn = Attention(**config)
    attn.fuse_projections()
    fused = attn.to_qkv if case == "self" else attn.to_kv
    with torch.no_grad():
        fused.weight.mul_(1.5)
    got, expected = routed_and_stock(attn, FusedAttnProcessor2_0(), **call())
    assert torch.equal(got, expected)


def test_a_legacy_processor_with_its_own_scale_keeps_it_and_is_reported_not_routed():
    """diffusers' old AttnProcessor honours attn.scale (scale_qk=False: 1.0) with its own matmuls, no SDPA call. Routed,
    it still computes exactly that, and the layer says it was not routed (no call counted)."""
    from diffusers.models.attention_processor import AttnProcessor

    config, call = CASES["self"]
    attn = Attention(**{**config, "scale_qk": False})
    assert isinstance(attn.processor, AttnProcessor)
    hidden = call()["hidden_states"]
    with torch.no_grad():
        expected = attn(hidden)
    router = routing.Router([backends.get("sdpa")], hardware.Machine({}, "cpu"), True, "sdpa")
    routing.route(attn, router)
    try:
        with torch.no_grad():
            got = attn(hidden)
    finally:
        routing.unroute(attn)
    assert torch.equal(got, expected) and router.served() == {}
    [layer] = router.to_json()["not_routed"]
    assert layer["processors"] == ["AttnProcessor"] and "AttnProcessor computes attention itself" in str(layer["why"])
