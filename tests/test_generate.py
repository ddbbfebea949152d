"""`sdcli generate` on the built-in tiny model: routing, evidence, reproducibility, recipes and bad input."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import pixels, run_sdcli, sdpa
from sdcli.images import read_parameters, read_recipe

TINY = ["--model", "tiny", "--steps", "3", "--seed", "42"]
UNET_LAYERS, VAE_LAYERS = 14, 2  # the tiny model: 7 transformer blocks × (self, cross); VAE encoder + decoder


def generate(cli, out, *args, code=0):
    return cli.json("generate", "a photo of an astronaut riding a horse on mars", *TINY, "-o", out, *args, code=code)


def test_generates_png_with_readable_recipe(cli, tmp_path):
    data = generate(cli, tmp_path)
    [image] = data["images"]
    params = read_parameters(image["file"])
    assert params["prompt"] == "a photo of an astronaut riding a horse on mars"
    assert params["Seed"] == "42" and params["Steps"] == "3" and params["Backend"] == "auto"
    assert params["Size"] == "128x128" and params["Model"] == "tiny" and params["Sampler"] == "Euler"
    assert "sdpa" in params["Attention"]
    recipe = read_recipe(image["file"])
    assert recipe["seed"] == 42 and recipe["versions"]["diffusers"] and recipe["device"] == "cpu"
    assert data["seconds_per_image"] > 0 and data["images_per_second"] > 0


def test_same_seed_same_backend_same_pixels(cli, tmp_path):
    a = generate(cli, tmp_path / "a")["images"][0]["file"]
    b = generate(cli, tmp_path / "b")["images"][0]["file"]
    c = cli.json("generate", "a photo of an astronaut riding a horse on mars", "--model", "tiny", "--steps", "3",
                 "--seed", "43", "-o", tmp_path / "c")["images"][0]["file"]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_sdpa_backend_equals_stock_diffusers(cli, tmp_path):
    """sdcli's routed processor with the SDPA backend gives the very pixels of diffusers' own processors."""
    import torch

    from sdcli.models import tiny

    stock = tiny()
    stock.set_progress_bar_config(disable=True)
    expected = stock("a red fox", num_inference_steps=3, guidance_scale=7.5,
                     generator=[torch.Generator().manual_seed(42)], output_type="pil").images[0]
    data = cli.json("generate", "a red fox", *TINY, "--backend", "sdpa", "-o", tmp_path)
    assert np.array_equal(pixels(data["images"][0]["file"]), np.asarray(expected))


def test_plan_and_call_counts(cli, tmp_path):
    data = generate(cli, tmp_path, "--backend", "sdpa-flash")
    att = data["attention"]
    assert att["strict"] and att["chain"] == ["sdpa-flash"]
    layers = att["layers"]
    assert len(layers) == UNET_LAYERS + VAE_LAYERS
    unet = [l for l in layers if l["layer"].startswith("unet.")]
    assert {l["kind"] for l in unet} == {"self", "cross"}
    assert {(l["heads"], l["head_dim"]) for l in unet} == {(2, 16), (2, 32)}
    for l in unet:  # CFG runs both halves in one batched call: one call per step
        assert l["calls"] == {"sdpa-flash": 3} and l["backend"] == "sdpa-flash"
        assert l["seqs"] and all(kv == 77 for _, kv in l["seqs"]) == (l["kind"] == "cross")
    decoder = next(l for l in layers if l["layer"] == "vae.decoder.mid_block.attentions.0")
    assert decoder["calls"] == {"sdpa-flash": 1} and decoder["head_dim"] == 64
    assert att["served"] == {"sdpa-flash": UNET_LAYERS * 3 + 1}


def test_verbose_prints_the_plan(cli, tmp_path):
    result = cli("generate", "a cat", *TINY, "-o", tmp_path, "--verbose")
    assert "Attention plan" in result.stdout and "2×32" in result.stdout and "vae" in result.stdout


def test_named_backend_that_cannot_serve_a_layer_fails_naming_it(cli, tmp_path, register_backend):
    from sdcli.backends import head_dim_at_most

    register_backend("narrow", sdpa, [head_dim_at_most(16)])
    result = cli("generate", "a cat", *TINY, "-o", tmp_path, "--backend", "narrow", code=1)
    assert "backend narrow can't serve layer unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1" in result.output
    assert "head dim 32 > 16" in result.output and "--fallback" in result.output
    assert not list(tmp_path.glob("*.png"))


def test_fallback_serves_other_layers_and_says_why(cli, tmp_path, register_backend):
    from sdcli.backends import head_dim_at_most

    register_backend("narrow", sdpa, [head_dim_at_most(16)])
    att = generate(cli, tmp_path, "--backend", "narrow", "--fallback")["attention"]
    by_dim = {}
    for l in att["layers"]:
        by_dim.setdefault(l["head_dim"], set()).update(l["calls"])
    assert by_dim[16] == {"narrow"} and by_dim[32] == {"sdpa"} and by_dim[64] == {"sdpa"}
    assert att["served"]["narrow"] == 6 * 3  # the six 16-wide layers, three steps
    assert {f["why"] for f in att["fallbacks"]} == {"head dim 32 > 16", "head dim 64 > 16"}


def test_auto_reports_its_plan_not_fallbacks(cli, tmp_path, register_backend):
    """With --quantized, a quantized kernel heads auto's order and can't take every layer: that is auto's plan at
    work, not a fallback. Only a backend the user named falls back."""
    from sdcli.backends import head_dim_at_most

    register_backend("q-narrow", sdpa, [head_dim_at_most(16)], kind="quantized", auto_rank=1)
    att = generate(cli, tmp_path, "--quantized", "--no-tune")["attention"]
    assert att["chain"] == ["q-narrow", "sdpa"] and att["served"] == {"q-narrow": 6 * 3, "sdpa": 8 * 3 + 1}
    assert sum("q-narrow" in l["refused"] for l in att["layers"]) == 8 + VAE_LAYERS
    assert att["fallbacks"] == []
    assert generate(cli, tmp_path / "exact", "--no-tune")["attention"]["chain"] == ["sdpa"]  # quantized: asked for


def test_kernel_error_on_first_call_falls_back_or_fails(cli, tmp_path, register_backend):
    """A limit the checks don't know: the kernel's own error at the first call decides, per layer."""
    def short_only(q, k, v, attn_mask=None, scale=None):
        if q.shape[1] > 64:
            raise RuntimeError("sequence too long for this kernel")
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("short", short_only)
    att = generate(cli, tmp_path / "ok", "--backend", "short", "--fallback")["attention"]
    long_layers = [l for l in att["layers"] if l["calls"] and max(q for q, _ in l["seqs"]) > 64]
    assert long_layers and all(set(l["calls"]) == {"sdpa"} for l in long_layers)
    assert all("sequence too long" in l["refused"]["short"] for l in long_layers)
    result = cli("generate", "a cat", *TINY, "-o", tmp_path / "strict", "--backend", "short", code=1)
    assert "can't serve layer unet.down_blocks.0" in result.output and "sequence too long" in result.output


def test_seeds_files_and_prompts_file(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog on a skateboard\n")
    data = cli.json("generate", "--prompts-file", prompts, "--model", "tiny", "--steps", "2", "--seed", "10",
                    "--num-images", "2", "--batch-size", "3", "-o", tmp_path / "out")
    got = [(i["item"], i["prompt"], i["seed"]) for i in data["images"]]
    assert got == [(0, "a cat", 10), (1, "a cat", 11), (2, "a dog on a skateboard", 12),
                   (3, "a dog on a skateboard", 13)]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["00000-10-a-cat.png", "00001-11-a-cat.png", "00002-12-a-dog-on-a-skateboard.png",
                     "00003-13-a-dog-on-a-skateboard.png"]


def test_existing_images_are_never_overwritten(cli, tmp_path):
    first = generate(cli, tmp_path)["images"][0]["file"]
    before = open(first, "rb").read()
    second = generate(cli, tmp_path)["images"][0]["file"]
    assert second != first and second.endswith("-1.png")
    assert open(first, "rb").read() == before


def test_scheduler_negative_prompt_and_size(cli, tmp_path):
    data = cli.json("generate", "a cat", *TINY, "-o", tmp_path, "--scheduler", "euler-a",
                    "--negative-prompt", "blurry, low quality", "--width", "64", "--height", "96")
    params = read_parameters(data["images"][0]["file"])
    assert params["Sampler"] == "Euler a" and params["Size"] == "64x96"
    assert params["negative_prompt"] == "blurry, low quality"
    assert pixels(data["images"][0]["file"]).shape == (96, 64, 3)


def test_a_scheduler_that_would_fail_at_its_last_step_is_refused_before_it_starts(cli, tmp_path):
    """DPM++ 2M Karras on the shapes model's zero-terminal-SNR schedule: from 21 steps diffusers meets its first
    timestep twice and fails at the last step (IndexError); refused up front, saying the steps that run."""
    args = ("generate", "a red circle on a blue background", "-m", "shapes", "--scheduler", "dpm++2m-karras",
            "--backend", "sdpa", "-o", tmp_path)
    result = cli(*args, "--steps", "21", code=2)
    assert "--scheduler dpm++2m-karras gives this model's noise schedule its first timestep twice" in result.stderr
    assert "it runs at --steps 20 or fewer" in result.stderr and not list(tmp_path.glob("*.png"))
    assert len(cli.json(*args, "--steps", "20")["images"]) == 1


def test_folder_model_loads_like_a_real_checkpoint(cli, tmp_path):
    from sdcli.models import tiny

    tiny().save_pretrained(tmp_path / "tiny-folder")
    a = generate(cli, tmp_path / "a")["images"][0]["file"]
    data = generate(cli, tmp_path / "b", "--model", tmp_path / "tiny-folder")
    assert read_parameters(data["images"][0]["file"])["Model"] == "tiny-folder"
    assert np.array_equal(pixels(a), pixels(data["images"][0]["file"]))


def test_nan_output_is_detected_and_explained(cli, tmp_path, register_backend):
    register_backend("nan", lambda q, k, v, attn_mask=None, scale=None: sdpa(q, k, v) * float("nan"))
    result = cli("generate", "a cat", *TINY, "-o", tmp_path, "--backend", "nan", code=3)
    assert "NaN in the latents" in result.output and "--dtype bf16" in result.output
    assert len(list(tmp_path.glob("*.png"))) == 1  # kept, so the user can look


def test_error_in_image_k_keeps_the_earlier_ones(cli, tmp_path, register_backend):
    calls = {"n": 0}

    def dies_later(q, k, v, attn_mask=None, scale=None):
        calls["n"] += 1
        if calls["n"] > UNET_LAYERS * 3 + 1:  # everything image 1 needs, then it breaks
            raise RuntimeError("illegal memory access")
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("flaky", dies_later)
    result = cli("generate", "a cat", *TINY, "--num-images", "3", "-o", tmp_path, "--backend", "flaky", code=1)
    assert "RuntimeError in image 2 (item 1, seed 43): illegal memory access" in result.output
    assert f"1 finished image kept in {tmp_path}" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["00000-42-a-cat.png"]


def test_ctrl_c_keeps_finished_images(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sdcli", "generate", "a cat", "--model", "tiny", "--steps", "25",
                             "--num-images", "200", "--seed", "1", "-o", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("0000*.png")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    finished = sorted(tmp_path.glob("*.png"))
    assert finished and "interrupted:" in stderr and f"kept in {tmp_path}" in stderr
    assert "to make the rest, run the same command with --resume --seed 1" in stderr
    assert "Traceback" not in stderr
    assert not list(tmp_path.glob(".*partial*"))
    for path in finished:
        assert read_parameters(path)["prompt"] == "a cat"  # complete files


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope"], "unknown attention backend 'nope'"),
    (["--width", "100"], "--width must be a positive multiple of 8, not 100"),
    (["--model", "./no/such/model"], "model path ./no/such/model does not exist"),
    (["--steps", "0"], "--steps must be at least 1, not 0"),
    (["--steps", "-5"], "--steps must be at least 1, not -5"),
    (["--scheduler", "magic"], "unknown --scheduler 'magic'"),
    (["--device", "cuda:7"], "--device cuda:7"),
    ([], "give a prompt, or --prompts-file"),
    (["--resume"], "--resume needs the --seed of the run it finishes"),
])
def test_bad_input_is_one_clear_line(cli, tmp_path, args, message):
    prompt = [] if args == [] else ["a cat"]
    result = cli("generate", *prompt, "--model", "tiny", "-o", tmp_path / "out", *args, code=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_unreadable_checkpoint_and_unwritable_output(cli, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    result = cli("generate", "a cat", "--model", bad, "-o", tmp_path / "out", code=2)
    assert f"cannot read checkpoint {bad}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = cli("generate", "a cat", "--model", "tiny", "-o", blocker / "out", code=2)
    assert "cannot write to output folder" in result.stderr


def test_uncached_hub_model_says_so(tmp_path):
    result = run_sdcli("generate", "a cat", "--model", "nobody/not-a-model", "-o", tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2 and "is not in the Hub cache" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_hub_fails_fast_with_one_line(tmp_path):
    """Not in the cache and no Hub: one line at once, not huggingface_hub's half a minute of retries."""
    result = run_sdcli("generate", "a cat", "--model", "nobody/not-a-model", "-o", tmp_path,
                       env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.stderr
    assert "is not in the Hub cache and the Hub can't be reached" in result.stderr and "--model tiny" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.gpu
def test_gpu_every_usable_backend_serves_and_counts(cli, tmp_path):
    doctor = cli.json("doctor")
    usable = [r["backend"] for r in doctor["verdicts"]["backends"] if r["status"] == "usable"]
    for name in usable:
        att = cli.json("generate", "a cat", *TINY, "-o", tmp_path / name, "--backend", name, "--fallback",
                       "--dtype", "fp16")["attention"]
        assert att["served"].get(name, 0) > 0, (name, att["fallbacks"])
