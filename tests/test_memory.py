"""A size that can't fit is refused before anything loads (exit 2, naming the largest size that fits), and Ctrl-C
answers at once even inside one long torch operation."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from conftest import REPORTS, make_plugin
from sdcli import families, memory, models
from sdcli.hardware import Machine
from sdcli.options import Options

GiB = 2**30


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: a refusal must come before."""
    from sdcli import models

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load", load)


@pytest.mark.parametrize("args, fits", [
    (["--width", "65536", "--height", "65536"], "the largest size that fits is --width"),
    (["--width", "1000000"], "--height 128"),  # the side given shrinks; the other stays native
])
def test_a_size_that_cannot_fit_is_one_line_before_anything_loads(cli, tmp_path, no_loading, args, fits):
    result = cli("generate", "a cat", "-m", "tiny", "--steps", "1", *args, "-o", tmp_path / "out", code=2)
    assert "can't fit: it needs about" in result.output and "GiB available" in result.output, result.output
    assert fits in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_largest_size_named_fits_and_the_next_does_not():
    fp = memory.TINY["tiny"]
    have = 3 * GiB

    def fits(w, h):
        return max(n for _, n in memory.needs(fp, w, h, 1, True, "fp32", "fp32", False, True)) <= have

    w, h = memory.largest_fitting(4096, 2048, 8, ["width", "height"], fits)
    assert fits(w, h) and not fits(w + 16, h + 8) and abs(w / h - 2) < 0.05  # the proportions kept


def test_a_gpu_is_judged_by_its_free_memory():
    """SD 1.5's first attention at 4096² holds 262,144² scores per head: refused on an H100 (78.6 GiB free)
    when computed whole (sdpa-math), let through with a fused kernel."""
    report = json.loads((REPORTS / "h100.json").read_text())
    sd = next(f for f in families.FAMILIES if f.name == "SD 1.x/2.x")
    machine = Machine(report, "cuda:0")
    math = Options.make("stable-diffusion-v1-5/stable-diffusion-v1-5", prompts=["a cat"], width=4096, height=4096,
                        guidance=7.5, backend="sdpa-math", output_dir=None)
    with pytest.raises(Exception, match=r"NVIDIA H100 80GB HBM3 \(SM90\) has 78.6 GiB free"):
        memory.must_fit(math, sd, machine, "bf16", "bf16", judged=False)
    memory.must_fit(replace(math, attention=replace(math.attention, backend="sdpa")), sd, machine, "bf16", "bf16",
                    judged=False)


@pytest.mark.parametrize("model", list(models.TINY))  # every small built-in, the trained shapes too
def test_the_tiny_footprints_are_the_built_pipelines(model):
    pipe = models.TINY[model]()
    family = families.of_pipeline(pipe)
    built = memory.of_configs(family, dict(getattr(pipe, family.denoiser).config), dict(pipe.vae.config),
                              family.native_size(pipe))
    assert built == memory.TINY[model]
    assert memory.footprint(model, family) == built


def test_architecture_footprints_are_the_published_models():
    sd = next(f for f in families.FAMILIES if f.name == "SD 1.x/2.x")
    assert memory.footprint("sd15-arch", sd) == memory.FAMILY["SD 1.x/2.x"]  # 8 heads at H/8·W/8, 512²
    sdxl = next(f for f in families.FAMILIES if f.name == "SDXL")
    assert memory.footprint("sdxl-arch", sdxl) == memory.Footprint(1024, heads=10, token_px=16)
    flux = next(f for f in families.FAMILIES if f.name == "Flux.1")
    assert memory.footprint("flux-dev-arch", flux) == memory.FAMILY["Flux.1"]


LONG_KERNEL = """
    import pathlib, torch
    from sdcli.backends import Backend
    def attention(q, k, v, attn_mask=None, scale=None):
        pathlib.Path(r"{marker}").write_text("inside")
        m = torch.eye(3072) * 0.5
        torch.linalg.matrix_power(m, 2**62)  # one torch call of minutes: Python can't interrupt it
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    backend = Backend("long", "one very long call", attention=attention)
"""


def start_inside_long_call(tmp_path, *command):
    """`sdcli *command` in a process of its own whose `long` kernel is one torch call of minutes; returns the
    process once it is inside that call."""
    marker = tmp_path / "marker"
    env = make_plugin(tmp_path, "longkernel", LONG_KERNEL.format(marker=marker), {"long": "backend"})
    proc = subprocess.Popen([sys.executable, "-m", "sdcli", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[1]
    time.sleep(0.5)  # inside matrix_power by now
    return proc


def test_ctrl_c_answers_at_once_inside_one_long_torch_call(tmp_path):
    """The real process boundary and a real SIGINT: the main thread is inside one torch call that would run for
    minutes; the process still stops within seconds, with 130 and what it kept."""
    proc = start_inside_long_call(tmp_path, "generate", "a cat", "-m", "tiny", "--steps", "1", "--seed", "3",
                                  "--backend", "long", "-o", str(tmp_path / "out"))
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert time.time() - sent < 15, f"{time.time() - sent:.0f} s after Ctrl-C"
    assert "stopped without waiting for it; no image was finished" in stderr and "Traceback" not in stderr


def test_ctrl_c_in_a_command_that_saves_when_the_call_ends_says_so_and_a_second_one_quits(tmp_path):
    """compare keeps what it finished once the operation ends: the first Ctrl-C says so within seconds, and a
    second one quits at once."""
    proc = start_inside_long_call(tmp_path, "compare", "-m", "tiny", "--steps", "1", "--backends", "long",
                                  "-o", str(tmp_path / "out"))
    proc.send_signal(signal.SIGINT)
    time.sleep(5)  # past the 3 s the main thread gets
    assert proc.poll() is None  # still waiting for the call, as said
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - sent < 15, stderr
    assert "what was finished is saved when it ends; Ctrl-C again quits now without saving" in stderr
    assert "stopped without waiting for it, as asked (a second Ctrl-C)" in stderr and "Traceback" not in stderr
