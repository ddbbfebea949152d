"""Every model family on its tiny built-in model: recognised before loading, routed and counted, the pixels of
stock diffusers, compared, and refused in one line where a family can't take a setting."""

import json

import numpy as np
import pytest

from conftest import pixels
from sdcli.images import read_parameters, read_recipe

FAMILIES = {"tiny": "SD 1.x/2.x", "tiny-sdxl": "SDXL", "tiny-sd3": "SD 3/3.5", "tiny-flux": "Flux.1"}
STEPS = ["--steps", "2", "--seed", "42"]


def attention_calls_of_stock(pipe, **call):
    """Calls per attention module of a stock diffusers run, counted by forward hooks: one module call is one
    attention call for every processor these families use."""
    from collections import Counter

    calls = Counter()
    for part in ("unet", "transformer", "vae"):
        model = getattr(pipe, part, None)
        for name, module in (model.named_modules() if model is not None else []):
            if hasattr(module, "processor"):
                module.register_forward_hook(lambda m, args, out, name=f"{part}.{name}": calls.update([name]))
    pipe(**call)
    return calls


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_transformer_families_route_and_count_every_attention_call(cli, tmp_path, model):
    import torch

    from sdcli import models

    stock = attention_calls_of_stock(models.TINY[model](), prompt="a cat", num_inference_steps=2,
                                     generator=torch.Generator().manual_seed(42))
    data = cli.json("generate", "a cat", "-m", model, *STEPS, "--backend", "sdpa-flash", "-o", tmp_path)
    att = data["attention"]
    served = {l["layer"]: l["calls"].get("sdpa-flash", 0) for l in att["layers"] if l["calls"]}
    assert served == dict(stock) and len(served) == 4  # three transformer layers, the VAE decoder's
    transformer = [l for l in att["layers"] if l["layer"].startswith("transformer.")]
    assert all(l["calls"] == {"sdpa-flash": 2} for l in transformer)  # CFG (SD 3) runs batched: one call a step
    joint = [l for l in transformer if l["kind"] == "joint"]
    # image tokens (8×8) and text tokens in one sequence: 77 CLIP + 256 T5 (SD 3), 512 T5 (Flux)
    assert {tuple(s) for l in joint for s in l["seqs"]} == {(64 + 333, 64 + 333) if model == "tiny-sd3" else (576, 576)}
    if model == "tiny-sd3":  # SD 3.5 Medium's second attention: the image tokens alone
        assert [l["seqs"] for l in transformer if l["kind"] == "self"] == [[[64, 64]]]
    [image] = data["images"]
    recipe = read_recipe(image["file"])
    assert recipe["family"] == FAMILIES[model] and recipe["model"] == model
    assert pixels(image["file"]).shape == (128, 128, 3)


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_sdpa_backend_equals_stock_diffusers_for_every_family(cli, tmp_path, model):
    """The pipeline decodes (SD 3's shift, Flux's packed latents): sdcli's routed attention changes no pixel.
    SD 1.x's twin is test_generate.py::test_sdpa_backend_equals_stock_diffusers."""
    import torch

    from sdcli import models

    stock = models.TINY[model]()
    expected = stock("a red fox", num_inference_steps=2, generator=[torch.Generator().manual_seed(42)],
                     output_type="pil").images[0]
    data = cli.json("generate", "a red fox", "-m", model, *STEPS, "--backend", "sdpa", "-o", tmp_path)
    assert np.array_equal(pixels(data["images"][0]["file"]), np.asarray(expected))


def test_recipes_say_each_familys_guidance(cli, tmp_path):
    sd3 = read_parameters(cli.json("generate", "a cat", "-m", "tiny-sd3", *STEPS, "-o", tmp_path)["images"][0]["file"])
    assert sd3["CFG scale"] == "7.0" and "Distilled CFG Scale" not in sd3  # the pipeline's own default
    flux = cli.json("generate", "a cat", "-m", "tiny-flux", *STEPS, "--guidance", "2.5", "--scheduler", "dpm++2m",
                    "-o", tmp_path)
    params = read_parameters(flux["images"][0]["file"])
    assert params["CFG scale"] == "1" and params["Distilled CFG Scale"] == "2.5"  # as Forge writes Flux's
    assert params["Sampler"] == "DPM++ 2M" and params["Model"] == "tiny-flux"


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_compare_gives_every_usable_backend_a_verdict(cli, tmp_path, model):
    usable = [r["backend"] for r in cli.json("doctor")["verdicts"]["backends"] if r["status"] == "usable"]
    result = cli.json("compare", "--seed", "42", "-m", model, "--steps", "2", "-o", tmp_path)
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == set(usable) and rows["sdpa-math"]["verdict"] == "reference"
    for name in set(usable) - {"sdpa-math"}:
        assert rows[name]["verdict"] == "pass", rows[name]
        assert rows[name]["kernel"]["layers_measured"] == 4  # every transformer layer and the VAE's, replayed
        assert rows[name]["served"] == {name: 3 * 2 + 1}


@pytest.mark.parametrize("args, message", [
    (["-m", "tiny-sd3", "--scheduler", "ddim"], "--scheduler ddim does not fit SD 3/3.5; choose default, euler,"),
    (["-m", "tiny", "--scheduler", "euler-karras"], "--scheduler euler-karras does not fit SD 1.x/2.x"),
    (["-m", "tiny-flux", "--negative-prompt", "blurry"], "Flux.1 has distilled guidance and no negative prompt"),
    (["-m", "tiny-flux", "--width", "120"], "--width must be a multiple of 16 for Flux.1, not 120"),
])
def test_settings_a_family_cant_take_are_one_line(cli, tmp_path, args, message):
    result = cli("generate", "a cat", *args, "-o", tmp_path, code=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_fused_projections_are_refused_for_sd3_whose_fused_processor_skips_the_norms(cli, tmp_path, command):
    result = cli(command, *(["a cat"] if command == "generate" else []), "-m", "tiny-sd3", "--fuse-qkv",
                 "-o", tmp_path, code=2)
    assert "--fuse-qkv does not fit SD 3/3.5: diffusers' FusedJointAttnProcessor2_0 skips the q/k norms" in \
        result.output and not list(tmp_path.glob("*.png"))


def test_unknown_pipeline_is_refused_before_any_weights_load(cli, tmp_path):
    folder = tmp_path / "wan"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                         "transformer": ["diffusers", "WanTransformer3DModel"]}))
    # weights that would fail to load: the refusal must come first
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    result = cli("generate", "a cat", "-m", folder, "-o", tmp_path / "out", code=2)
    assert result.stderr.strip() == (f"error: {folder} holds a WanPipeline, which sdcli does not run; it runs "
                                     "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL), "
                                     "StableDiffusion3Pipeline (SD 3/3.5), FluxPipeline (Flux.1)")


def test_checkpoints_are_recognised_from_their_keys(cli, tmp_path):
    """Names and shapes only (zero-size tensors here): diffusers' own inference of what a file holds."""
    import torch
    from safetensors.torch import save_file

    from sdcli import models

    def checkpoint(name, shapes):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path)
        return str(path)

    flux = checkpoint("flux1-dev", {"double_blocks.0.img_attn.norm.key_norm.scale": (0,),
                                    "guidance_in.in_layer.bias": (0,), "img_in.weight": (0, 64)})
    sd35 = checkpoint("sd3.5_medium", {
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (0, 9216),
        "model.diffusion_model.pos_embed": (1, 147456, 0)})
    assert models.recognise(flux).name == "Flux.1" and models.recognise(sd35).name == "SD 3/3.5"
    video = checkpoint("ltx", {"model.diffusion_model.patchify_proj.weight": (0,)})
    result = cli("generate", "a cat", "-m", video, "-o", tmp_path / "out", code=2)
    assert "is a 'ltx-video' checkpoint (diffusers' name for it), which sdcli does not " \
                                      "run; it runs StableDiffusionPipeline" in result.stderr, result.stderr


def test_doctor_judges_the_transformer_families_shapes(cli):
    flash = next(r for r in cli.json("doctor")["verdicts"]["backends"] if r["backend"] == "sdpa-flash")
    assert flash["serves"]["SD 3.5 Medium 1024²"] == {"ok": 2, "of": 2, "refused": []}
    assert flash["serves"]["Flux.1 1024²"] == {"ok": 1, "of": 1, "refused": []}


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_python_api_routes_and_unroutes_transformer_families(cli, tmp_path, model):
    import sdcli
    from sdcli import models

    pipe = models.TINY[model]()
    stock = {name: type(p) for name, p in pipe.transformer.attn_processors.items()}
    plan = sdcli.route(pipe, backend="sdpa")
    pipe("a lighthouse", num_inference_steps=2)
    data = cli.json("generate", "a lighthouse", "-m", model, "--steps", 2, "--seed", 0, "--backend", "sdpa",
                    "-o", tmp_path)
    assert plan.served()["layers"] == {l["layer"]: l["calls"] for l in data["attention"]["layers"]}
    sdcli.unroute(pipe)
    processors = pipe.transformer.attn_processors
    assert {name: type(p) for name, p in processors.items()} == stock
    assert all(getattr(p, "_attention_backend", None) is None for p in processors.values())
    pipe("a lighthouse", num_inference_steps=1)
    assert plan.served()["layers"] == {l["layer"]: l["calls"] for l in data["attention"]["layers"]}  # no more
