"""--lora FILE[:SCALE]: loaded through diffusers' own loader (PEFT), routing untouched, in the recipe as A1111
writes it, in auto's plan key and in what --resume compares. LoRAs are made offline for the tiny models."""

import hashlib
import json

import numpy as np
import pytest

from conftest import make_lora, pixels
from sdcli.images import read_parameters, read_recipe

TINY = ["-m", "tiny", "--steps", "2", "--seed", "5"]
CALLS = 14 * 2 + 1  # the tiny UNet's 14 attention layers × 2 steps (CFG batched) + the VAE decoder's


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {"style": make_lora(folder, name="style"), "detail": make_lora(folder, name="detail", seed=1),
            "flux": make_lora(folder, model="tiny-flux", name="fluxstyle")}


def a1111_hash(path) -> str:
    """A1111's short hash of a .safetensors LoRA, written out here independently: sha256 of the bytes after the
    8-byte header length and the JSON header, first 12 hex digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_a_lora_changes_the_image_as_diffusers_does_and_routing_still_counts(cli, tmp_path, loras):
    import torch

    from sdcli.models import tiny

    plain = cli.json("generate", "a cat", *TINY, "--backend", "sdpa", "-o", tmp_path / "plain")["images"][0]["file"]
    data = cli.json("generate", "a cat", *TINY, "--backend", "sdpa", "--lora", f"{loras['style']}:0.8",
                    "-o", tmp_path / "lora")
    made = data["images"][0]["file"]
    assert data["attention"]["served"] == {"sdpa": CALLS}  # PEFT wraps the projections; the attention is routed
    stock = tiny()
    stock.load_lora_weights(str(loras["style"]), adapter_name="style")
    stock.set_adapters(["style"], adapter_weights=[0.8])
    expected = stock("a cat", num_inference_steps=2, guidance_scale=7.5, output_type="pil",
                     generator=[torch.Generator().manual_seed(5)]).images[0]
    assert np.array_equal(pixels(made), np.asarray(expected))
    assert not np.array_equal(pixels(made), pixels(plain))


def test_the_recipe_names_each_lora_as_a1111_does(cli, tmp_path, loras):
    data = cli.json("generate", "a cat", *TINY, "--lora", loras["style"], "--lora", f"{loras['detail']}:0.5",
                    "-o", tmp_path)
    path = data["images"][0]["file"]
    params = read_parameters(path)
    assert params["prompt"] == "a cat <lora:style:1> <lora:detail:0.5>"
    assert params["Lora hashes"] == f"style: {a1111_hash(loras['style'])}, detail: {a1111_hash(loras['detail'])}"
    recipe = read_recipe(path)
    assert recipe["prompt"] == "a cat" and [(x["name"], x["scale"]) for x in recipe["loras"]] == [("style", 1.0),
                                                                                               ("detail", 0.5)]


def test_resume_compares_loras_by_content_and_scale(cli, tmp_path, loras):
    out = tmp_path / "out"
    cli("generate", "a cat", *TINY, "--lora", f"{loras['style']}:0.8", "--num-images", "2", "-o", out)
    (out / "00001-6-a-cat.png").unlink()
    copy = tmp_path / "copy" / "style.safetensors"  # the same LoRA under another path: the same pixels
    copy.parent.mkdir()
    copy.write_bytes(loras["style"].read_bytes())
    data = cli.json("generate", "a cat", *TINY, "--lora", f"{copy}:0.8", "--num-images", "2", "--resume", "-o", out)
    assert data["skipped"] == [0] and [i["item"] for i in data["images"]] == [1]
    result = cli("generate", "a cat", *TINY, "--lora", f"{copy}:0.5", "--num-images", "2", "--resume", "-o", out,
                 code=2)
    assert "was made with loras" in result.output and "'scale': 0.8" in result.output


def test_auto_measures_a_plan_of_its_own_for_a_lora(cli, tmp_path, loras, monkeypatch):
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))
    plain = cli.json("generate", "a cat", *TINY, "-o", tmp_path / "a")["tuning"]
    with_lora = cli.json("generate", "a cat", *TINY, "--lora", loras["style"], "-o", tmp_path / "b")["tuning"]
    again = cli.json("generate", "a cat", *TINY, "--lora", loras["style"], "-o", tmp_path / "c")["tuning"]
    assert not with_lora["cached"] and with_lora["path"] != plain["path"]
    assert again["cached"] and again["path"] == with_lora["path"]
    assert with_lora["key"]["loras"] == [{"name": "style", "hash": a1111_hash(loras["style"]), "scale": 1.0}]


def test_fused_projections_keep_the_lora(cli, tmp_path, loras):
    """diffusers' fuse_qkv_projections on PEFT's layers drops the LoRA silently: sdcli merges it in first."""
    args = [*TINY, "--backend", "sdpa", "--lora", f"{loras['style']}:0.8"]
    unfused = pixels(cli.json("generate", "a cat", *args, "-o", tmp_path / "a")["images"][0]["file"])
    fused = pixels(cli.json("generate", "a cat", *args, "--fuse-qkv", "-o", tmp_path / "b")["images"][0]["file"])
    plain = pixels(cli.json("generate", "a cat", *TINY, "--backend", "sdpa", "--fuse-qkv",
                            "-o", tmp_path / "c")["images"][0]["file"])
    assert np.abs(fused.astype(int) - unfused).max() <= 1 and np.abs(fused.astype(int) - plain).max() > 10


def test_transformer_families_take_loras_too(cli, tmp_path, loras):
    args = ["-m", "tiny-flux", "--steps", "2", "--seed", "1", "--backend", "sdpa", "-o"]
    plain = cli.json("generate", "a cat", *args, tmp_path / "a")
    data = cli.json("generate", "a cat", *args, tmp_path / "b", "--lora", loras["flux"])
    assert data["attention"]["served"] == plain["attention"]["served"]
    assert not np.array_equal(pixels(data["images"][0]["file"]), pixels(plain["images"][0]["file"]))


def test_compare_and_bench_take_loras(cli, tmp_path, loras):
    result = cli.json("compare", "-m", "tiny", "--steps", "1", "--backends", "sdpa", "--lora", loras["style"],
                      "-o", tmp_path / "cmp")
    assert [r["verdict"] for r in result["rows"]] == ["reference", "pass"]
    bench = cli.json("bench", "-m", "tiny", "--steps", "1", "--batch-sizes", "1", "--repeats", "1", "--no-find-max",
                     "--no-micro", "--backends", "sdpa", "--lora", loras["style"], "-o", tmp_path / "bench")
    assert [c["name"] for c in bench["configs"]] == ["diffusers", "auto", "sdpa"]


@pytest.mark.parametrize("spec, message", [
    ("missing.safetensors", "is not a file (give FILE or FILE:SCALE"),
    ("STYLE:nan", "the scale must be a finite number"),
    ("STYLE:0.5:x", "is not a file"),
    ("NOTES", "is not a LoRA file (.safetensors, .bin, .pt, .pth)"),
    ("FLUX", "cannot load LoRA"),  # a Flux LoRA into an SD pipeline
])
def test_bad_loras_are_one_line_before_anything_is_made(cli, tmp_path, loras, spec, message):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a LoRA")
    spec = (spec.replace("STYLE", str(loras["style"])).replace("FLUX", str(loras["flux"]))
            .replace("NOTES", str(notes)))
    result = cli("generate", "a cat", *TINY, "--lora", spec, "-o", tmp_path / "out", code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_a_lora_hash_is_read_once_per_file_version(loras, tmp_path):
    from sdcli import lora

    copy = tmp_path / "x.safetensors"
    copy.write_bytes(loras["style"].read_bytes())
    assert lora.parse(f"{copy}:2").hash == a1111_hash(copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # new content, new hash
    copy.write_bytes(bytes(data))
    assert lora.parse(str(copy)).hash == a1111_hash(copy)
    assert json.dumps(lora.keys([str(copy)]))  # JSON-ready for the recipe
