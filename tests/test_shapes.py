"""The built-in `shapes` model makes the pictures its prompts ask for, its attention is trained (guidance and words
matter, a wrong kernel shows), and the planted faults fail `compare` on its captured activations alone, in every
dtype. Pictures are judged by pixel statistics (sdcli.shapes.colours): the colours of the shape and background."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, pixels
from sdcli import shapes

PROMPTS = shapes.EXAMPLES
SEEDS = 2  # per prompt: seeds 7 and 8
STEPS = "15"
FAULTS = ["scale-x1.01", "scale-x1.02", "last-key-dropped", "bias-0.4pct", "keys-shuffled"]


def render(cli, tmp_path, *args):
    """Every prompt × seed in one `sdcli generate` run; returns [(prompt, pixels)]."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    data = cli.json("generate", "--prompts-file", prompts, "-m", "shapes", "--num-images", SEEDS, "--seed", 7,
                    "--steps", STEPS, "--batch-size", len(PROMPTS) * SEEDS, "--backend", "sdpa", "-o", out, *args)
    return [(image["prompt"], pixels(image["file"])) for image in data["images"]]


def shape_colour_share(image, prompt) -> float:
    """The share of the picture whose nearest palette colour is the one the prompt gives the shape: a faint,
    missing or wrongly coloured shape scores less."""
    palette = np.array(list(shapes.COLOURS.values()), float)
    nearest = np.argmin(((image.reshape(-1, 1, 3).astype(float) - palette) ** 2).sum(-1), axis=1)
    return float((nearest == list(shapes.COLOURS).index(shapes.parse(prompt)["colour"])).mean())


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    from conftest import Cli

    return render(Cli(), tmp_path_factory.mktemp("guided"))


def test_pictures_have_the_colours_their_prompts_name(guided):
    misses = [(p, shapes.colours(im)) for p, im in guided if not shapes.matches(im, p)]
    total = len(PROMPTS) * SEEDS
    assert len(guided) == total and len(misses) <= 0.1 * total, misses  # the bar: at least 90 % pass


def test_guidance_brings_the_picture_closer_to_the_prompt(cli, tmp_path, guided):
    unguided = render(cli, tmp_path, "--guidance", "1")  # diffusers runs no CFG at ≤ 1: 0 and 1 are the same
    passed = [sum(shapes.matches(im, p) for p, im in pictures) for pictures in (guided, unguided)]
    share = [np.mean([shape_colour_share(im, p) for p, im in pictures]) for pictures in (guided, unguided)]
    assert passed[0] >= passed[1] and share[0] > 1.15 * share[1], (passed, share)


def test_a_wrong_kernel_visibly_breaks_the_picture(cli, tmp_path, guided, register_backend):
    import planted_faults

    register_backend("keys-shuffled", planted_faults.keys_shuffled)
    broken = render(cli, tmp_path, "--backend", "keys-shuffled")
    passed = sum(shapes.matches(im, p) for p, im in broken)
    changed = min(np.abs(a.astype(int) - b.astype(int)).max() for (_, a), (_, b) in zip(guided, broken))
    assert passed <= 0.5 * len(broken) and changed > 64, (passed, changed)  # every picture moved by > 1/4


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_planted_faults_fail_compare_on_the_captured_activations_alone(cli, tmp_path, dtype, register_backend):
    """Trained attention is sharp: each planted fault breaks the bound on the layers' real inputs, without the
    sampled ones that compare adds per shape (which the random `tiny` model needs), and a correct kernel passes."""
    import planted_faults

    for backend in planted_faults.backends:
        register_backend(backend.name, backend.attention)
    data = cli.json("compare", "-m", "shapes", "--prompt", PROMPTS[0], "--seed", 7, "--steps", 1, "--dtype", dtype,
                    "--backends", ",".join(["sdpa", *FAULTS]), "-o", tmp_path, code=1)
    rows = {r["backend"]: r for r in data["rows"]}
    assert rows["sdpa"]["verdict"] == "pass", rows["sdpa"]["why"]
    for name in FAULTS:
        captured = [c for c in rows[name]["kernel"]["per_layer"] if c["inputs"] == "captured" and c["status"] == "ok"]
        assert len(captured) == rows["sdpa"]["kernel"]["layers_measured"] > 0
        worst = max(c["ratio"] for c in captured)
        assert rows[name]["verdict"] == "FAIL" and worst > data["thresholds"]["exact_tol"], (name, worst)


def test_the_weights_ship_in_the_package_and_are_small():
    """Every file of the model is matched by the package data that pip installs, and together they are ≤ 20 MB."""
    import tomllib

    files = {p for p in shapes.FOLDER.rglob("*") if p.is_file()}
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sdcli"]
    carried = {p for pattern in patterns for p in (ROOT / "sdcli").glob(pattern)}
    assert files and files <= carried
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    training = json.loads((shapes.FOLDER / "training.json").read_text())
    assert not training["quick"] and training["picture_check"] >= 0.9
