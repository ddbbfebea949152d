"""Routing at the attention call, through the public API: whatever diffusers feature is used before or after
`sdcli.route` (IP-Adapter, a processor swap, fused projections, attention slicing, Flux's backend switch,
torch.compile, a ControlNet, PAG), the pixels are stock's with `backend="sdpa"`, every routed call is counted
where it ran, and a layer that sdcli did not route says so."""

import numpy as np
import pytest
import torch

import sdcli
import tiny_pipelines
from sdcli import models

SD_CALLS = 14 * 2 + 1  # tiny: 14 UNet layers × 2 steps (CFG batched) + the VAE decoder's one


def images(pipe, steps=2, **call):
    out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np", **call)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def unet_layers(plan) -> dict:
    return {name: calls for name, calls in plan.served()["layers"].items() if name.startswith("unet.")}


def ip_adapter_weights(unet, seed=0) -> dict:
    """A random IP-Adapter for `unet` in the layout diffusers' loader takes ({"image_proj", "ip_adapter"}): image
    keys and values for each cross-attention, and the projection of an image embedding into 4 tokens."""
    from diffusers.models.embeddings import ImageProjection

    gen = torch.Generator().manual_seed(seed)
    weights, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            shape = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape
            weights[f"{key}.to_k_ip.weight"] = torch.randn(shape, generator=gen) * 0.1
            weights[f"{key}.to_v_ip.weight"] = torch.randn(shape, generator=gen) * 0.1
            key += 2  # diffusers numbers the processors, each cross-attention gets the odd one
    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    proj = ImageProjection(cross_attention_dim=cross, image_embed_dim=cross, num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": weights}


def load_ip_adapter(pipe, weights) -> None:
    pipe.load_ip_adapter(weights, subfolder="", weight_name="", image_encoder_folder=None)


@pytest.mark.parametrize("when", ["before", "after"])
def test_ip_adapter_loaded_before_or_after_route_is_routed_with_its_image_tokens_counted(when):
    embeds = {"prompt": "a cat", "ip_adapter_image_embeds": [torch.randn(2, 1, 32, generator=torch.Generator()
                                                                         .manual_seed(3))]}
    stock = models.tiny()
    weights = ip_adapter_weights(stock.unet)
    load_ip_adapter(stock, weights)
    expected = images(stock, **embeds)

    pipe = models.tiny()
    if when == "before":
        load_ip_adapter(pipe, weights)
    plan = sdcli.route(pipe, backend="sdpa")
    if when == "after":
        load_ip_adapter(pipe, weights)
    assert np.array_equal(images(pipe, **embeds), expected)
    image_tokens = {name: calls for name, calls in plan.served()["layers"].items() if name.endswith("attn2#2")}
    assert len(image_tokens) == 7 and all(calls == {"sdpa": 2} for calls in image_tokens.values())
    assert plan.served()["backends"] == {"sdpa": SD_CALLS + 7 * 2}
    assert plan.served()["processors"]["unet.mid_block.attentions.0.transformer_blocks.0.attn2"] == \
        ["IPAdapterAttnProcessor2_0"]


def test_set_default_attn_processor_works_and_its_layers_say_they_were_not_routed():
    pipe = models.tiny()
    plan = sdcli.route(pipe, backend="sdpa")
    pipe.unet.set_default_attn_processor()  # diffusers' exact class check: sdcli's routing must not be in its way
    images(pipe, prompt="a cat")
    assert plan.served()["backends"] == {"sdpa": 1}  # the VAE's only: AttnProcessor computes with its own matmuls
    assert all(calls == {} for calls in unet_layers(plan).values())
    not_routed = plan.served()["not_routed"]
    assert len(not_routed) == 14 and all(
        why == {"AttnProcessor computes attention itself (no SDPA or dispatcher call): not routed": 2}
        for why in not_routed.values())
    summary = plan.to_json()["not_routed"]
    assert {tuple(layer["processors"]) for layer in summary} == {("AttnProcessor",)}


def test_fused_projections_after_route_stay_routed_with_stock_pixels():
    stock = models.tiny()
    stock.fuse_qkv_projections()
    pipe = models.tiny()
    plan = sdcli.route(pipe, backend="sdpa")
    pipe.fuse_qkv_projections()
    assert np.array_equal(images(pipe, prompt="a cat"), images(stock, prompt="a cat"))
    assert plan.served()["backends"] == {"sdpa": SD_CALLS}
    assert {p for ps in plan.served()["processors"].values() for p in ps} == {"FusedAttnProcessor2_0"}


def test_attention_slicing_and_a_processor_swap_are_reported_as_they_are():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Mine(AttnProcessor2_0):  # a user's own processor: it calls torch's SDPA, so it is routed
        pass

    pipe = models.tiny()
    plan = sdcli.route(pipe, backend="sdpa")
    pipe.enable_attention_slicing(1)
    images(pipe, prompt="a cat")
    assert all(calls == {} for calls in unet_layers(plan).values())  # SlicedAttnProcessor: its own bmm, no SDPA
    assert {p for name, ps in plan.served()["processors"].items() if name.startswith("unet.") for p in ps} == \
        {"SlicedAttnProcessor"}
    assert all("SlicedAttnProcessor computes attention itself" in next(iter(why))
               for why in plan.served()["not_routed"].values())

    plan.reset()
    pipe.unet.set_attn_processor(Mine())
    images(pipe, prompt="a cat")
    assert plan.served()["backends"] == {"sdpa": SD_CALLS} and plan.served()["not_routed"] == {}
    assert set(unet_layers(plan)) == {n for n, ps in plan.served()["processors"].items() if ps[-1:] == ["Mine"]}


def test_flux_set_attention_backend_after_route_is_still_routed():
    """Flux's processors call diffusers' dispatcher with the backend set_attention_backend gave them; a routed layer's
    call goes to the plan's backend instead: here `sdpa`, whose call is diffusers' own native one."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    stock = models.tiny_flux()
    expected = images(stock, prompt="a cat", height=64, width=64)
    pipe = models.tiny_flux()
    plan = sdcli.route(pipe, backend="sdpa")
    active = _AttentionBackendRegistry._active_backend
    pipe.transformer.set_attention_backend("_native_math")  # diffusers makes it the process's default too
    try:
        assert np.array_equal(images(pipe, prompt="a cat", height=64, width=64), expected)
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
    transformer = {n: c for n, c in plan.served()["layers"].items() if n.startswith("transformer.")}
    assert len(transformer) == 3 and all(calls == {"sdpa": 2} for calls in transformer.values())
    assert {p for ps in plan.served()["processors"].values() for p in ps} == {"FluxAttnProcessor", "AttnProcessor2_0"}


def test_torch_compile_fullgraph_of_a_routed_unet_with_no_warm_up_is_one_graph_with_exact_counts():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    stock = models.tiny()
    expected = images(stock, prompt="a cat")
    pipe = models.tiny()
    plan = sdcli.route(pipe, backend="sdpa")
    graphs = CompileCounter()  # dynamo's graphs, run as they are (no inductor: minutes of C++ on this CPU)
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend=graphs)
    try:
        got = images(pipe, prompt="a cat")
        images(pipe, prompt="a cat")
    finally:
        torch._dynamo.reset()
    assert graphs.frame_count == 1 and np.array_equal(got, expected)
    assert plan.served()["backends"] == {"sdpa": 2 * SD_CALLS}
    assert all(calls == {"sdpa": 4} for calls in unet_layers(plan).values())
    assert set(plan.served()["processors"]["unet.mid_block.attentions.0.transformer_blocks.0.attn1"]) == \
        {"AttnProcessor2_0"}


PIPELINES = {
    "sd-controlnet": (tiny_pipelines.sd_controlnet, lambda: {"prompt": "a cat", "image": control_image()}),
    "sd-pag": (tiny_pipelines.sd_pag, lambda: {"prompt": "a cat"}),
    "pixart-sigma": (tiny_pipelines.pixart_sigma, lambda: {"prompt": "a cat", "use_resolution_binning": False,
                                                           "clean_caption": False}),
    "kandinsky-2.2": (tiny_pipelines.kandinsky22, lambda: {
        "image_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(1)),
        "negative_image_embeds": torch.zeros(1, 32), "height": 64, "width": 64}),
    "wan-2.1": (tiny_pipelines.wan, lambda: {"prompt": "a cat", "height": 32, "width": 32, "num_frames": 5}),
}


@pytest.mark.parametrize("name", PIPELINES)
def test_any_pipeline_routes_every_model_with_stock_pixels(name):
    """Pipelines sdcli has no family for: every model with attention (ControlNet, PAG's layers, PixArt's masked
    cross-attention, Kandinsky's added keys, Wan's dispatcher calls) is routed, each call is counted, and `sdpa`
    changes no pixel. Calls per layer are checked against a stock run's module calls."""
    build, call = PIPELINES[name]
    stock = build()
    forwards = module_calls(stock, **call())
    pipe = build()
    plan = sdcli.route(pipe, backend="sdpa")
    assert np.array_equal(images(pipe, **call()), images(stock, **call()))
    served = {name: sum(calls.values()) for name, calls in plan.served()["layers"].items() if calls}
    assert served == forwards and plan.served()["not_routed"] == {}
    if name == "sd-controlnet":
        assert sum(1 for layer in served if layer.startswith("controlnet.")) == 6
    sdcli.unroute(pipe)
    assert all("forward" not in module.__dict__ for model in pipe.components.values()
               if isinstance(model, torch.nn.Module) for module in model.modules())


def control_image():
    from PIL import Image

    return Image.new("RGB", (128, 128), "white")


def module_calls(pipe, **call) -> dict:
    """Calls per attention module of a stock run, by forward hooks (one call each for these pipelines)."""
    from collections import Counter

    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    calls = Counter()
    for part, model in pipe.components.items():
        for name, module in (model.named_modules() if isinstance(model, torch.nn.Module) else []):
            if isinstance(module, (Attention, AttentionModuleMixin)):
                module.register_forward_hook(lambda m, args, out, name=f"{part}.{name}": calls.update([name]))
    images(pipe, **call)
    return dict(calls)


def test_route_twice_is_idempotent_and_unroute_restores_exactly():
    import gc

    gc.collect()  # other tests' routed pipelines: with none left, unroute puts torch's SDPA back too
    pipe = models.tiny()
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    first = sdcli.route(pipe, backend="sdpa")
    second = sdcli.route(pipe, backend="sdpa-math")
    images(pipe, prompt="a cat")
    assert first.served()["backends"] == {} and second.served()["backends"] == {"sdpa-math": SD_CALLS}
    sdcli.unroute(pipe)
    assert all("forward" not in m.__dict__ for model in (pipe.unet, pipe.vae) for m in model.modules())
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
    assert torch.nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    images(pipe, prompt="a cat")
    assert second.served()["backends"] == {"sdpa-math": SD_CALLS}  # unrouted: nothing more counted


def test_layers_never_reached_are_listed_as_such(cli, tmp_path):
    data = cli.json("generate", "a cat", "-m", "tiny", "--steps", 1, "--seed", 0, "--backend", "sdpa", "-o", tmp_path)
    encoder = [l for l in data["attention"]["layers"] if l["layer"].startswith("vae.encoder.")]
    assert encoder and all(l["processors"] == [] and l["calls"] == {} for l in encoder)  # txt2img never encodes
    vae = next(g for g in data["attention"]["groups"] if g["part"] == "vae")
    assert vae["not_reached"] == 1 and vae["processors"] == ["AttnProcessor2_0"]


def test_two_threads_running_routed_pipelines_count_each_its_own_calls():
    """Which layer is running is known per thread: a service running two routed pipelines at once keeps their
    counts apart (and each one's calls on its own backend)."""
    from concurrent.futures import ThreadPoolExecutor

    pipes = [models.tiny(), models.tiny()]
    plans = [sdcli.route(pipes[0], backend="sdpa"), sdcli.route(pipes[1], backend="sdpa-math")]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda pipe: [images(pipe, prompt="a cat") for _ in range(3)], pipes))
    assert plans[0].served()["backends"] == {"sdpa": 3 * SD_CALLS}
    assert plans[1].served()["backends"] == {"sdpa-math": 3 * SD_CALLS}
