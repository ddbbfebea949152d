"""What a new user meets in the first hour (issue 23): help that says what options take, messages that are true
and whole, nothing left behind by a run that failed, every interruption saying how to go on, a CPU that isn't
called a GPU, a busy machine named as the cause of slowness, and caches that can't be used never stopping a run."""

import json
import re

import pytest
import torch

from conftest import REPORTS, ROOT, sdpa
from sdcli.backends import NOT_INSTALLED, Refusal, head_dim_in

TINY = ["-m", "tiny", "--steps", "1", "--seed", "7"]


# ----- help ----------------------------------------------------------------------------------------------


def test_help_lists_the_built_in_models_and_the_size_step_of_each_family_and_flags_read_as_flags(cli):
    from sdcli import families

    text = re.sub(r"[\s│]+", " ", cli("generate", "--help", env={"COLUMNS": "200"}).stdout)
    for name in (n for f in families.FAMILIES for n in f.builtins):
        assert name in text, name
    assert "SD 3/3.5: a multiple of 16" in text and "Flux.1: a multiple of 16" in text and "SDXL: a multiple of 8" in text
    assert "<bool>" not in text and "--fallback --no-fallback Let other" in text


# ----- messages ----------------------------------------------------------------------------------------------


def test_table_cells_from_outside_are_shown_as_written(cli, register_backend):
    """rich takes `[cu13]` for markup and drops it: a pip spec with extras must reach the user whole."""
    def missing(machine, shape):
        return Refusal(NOT_INSTALLED, "needs [bold]x[/bold] installed", "pip install 'kernel[cu13]>=1.0'")

    register_backend("bracketed", sdpa, [missing])
    out = cli("doctor", env={"COLUMNS": "250"}).stdout
    assert "pip install 'kernel[cu13]>=1.0'" in out and "needs [bold]x[/bold] installed" in out


def test_repeated_fallbacks_are_folded_and_counts_have_the_right_plural(cli, tmp_path, register_backend):
    register_backend("vae-only", sdpa, [head_dim_in(64)])  # serves the VAE decoder's one call, nothing else
    out = cli("generate", "a cat", *TINY, "--backend", "vae-only", "--fallback", "-o", tmp_path).stdout
    assert "Attention (vae-only): sdpa 14 calls, vae-only 1 call\n" in out
    fallbacks = [line.strip() for line in out.splitlines() if "fallback:" in line]
    assert fallbacks == [  # the 16-wide and the 32-wide UNet layers: a line each, not fourteen
        "fallback: 6 layers of the unet (--json lists each) → sdpa (vae-only: head dim 16 not in 64)",
        "fallback: 8 layers of the unet (--json lists each) → sdpa (vae-only: head dim 32 not in 64)"], out


def test_a_cpu_is_not_called_a_gpu(cli):
    rows = {r["backend"]: r for r in cli.json("doctor", "--report", REPORTS / "cpu.json")["verdicts"]["backends"]}
    assert "unsupported on this GPU" not in {r["status"] for r in rows.values()}
    assert rows["sdpa-cudnn"]["status"] == rows["flex-compiled"]["status"] == "needs a GPU"


# ----- a named backend that can't run here --------------------------------------------------------------------


@pytest.mark.parametrize("command", [["generate", "a cat", *TINY, "--backend", "flash-attn"],
                                     ["bench", "-m", "tiny", "--backends", "sdpa,flash-attn"]])
def test_a_named_backend_that_cannot_run_here_is_refused_before_the_model_loads(cli, tmp_path, monkeypatch,
                                                                                command):
    from sdcli import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    result = cli(*command, "-o", tmp_path / "out", code=2)
    assert "flash-attn can't run here (not installed): flash-attn is not installed; fix: pip install flash-attn " \
           "--no-build-isolation" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ----- single-file checkpoints ----------------------------------------------------------------------------


def test_a_single_file_says_what_it_needs_from_the_hub_before_loading(cli, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from sdcli import models

    path = tmp_path / "my-sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(0, 4, 3, 3)}, path)  # SD 1.x's names
    monkeypatch.setattr(models, "_in_hub_cache", lambda repo, name: None)
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    result = cli("generate", "a cat", "-m", path, "--steps", "1", "-o", tmp_path / "out", code=2)
    one = result.output.strip()
    assert len(one.splitlines()) == 1 and f"{path} is a single file, which holds weights only" in one
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hub" in one and "the Hub can't be reached" in one
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include" in one


def test_a_ckpt_that_torch_refuses_is_one_whole_line(cli, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "trainer": re.compile("an object, not a tensor")}, path)
    result = cli("generate", "a cat", "-m", path, "-o", tmp_path / "out", code=2)
    one = result.output.strip()
    assert len(one.splitlines()) == 1 and one.endswith("scripts/convert_original_stable_diffusion_to_diffusers.py)")
    assert "holds Python objects, which torch's safe loader refuses" in one and "\x1b" not in one


# ----- runs that stop ----------------------------------------------------------------------------------------


def test_a_run_that_fails_leaves_no_empty_folder(cli, tmp_path, register_backend):
    def broken(q, k, v, attn_mask=None, scale=None):
        raise RuntimeError("illegal memory access")

    register_backend("broken", broken)
    out = tmp_path / "a" / "b"
    result = cli("generate", "a cat", *TINY, "--backend", "broken", "-o", out, code=1)
    assert "illegal memory access" in result.output and not (tmp_path / "a").exists()


def test_an_interrupted_generate_says_how_to_finish(cli, tmp_path, register_backend):
    calls = {"n": 0}

    def ctrl_c_in_image_2(q, k, v, attn_mask=None, scale=None):
        calls["n"] += 1
        if calls["n"] > 14 + 1:  # one step of 14 UNet layers and the VAE's: image 1 is whole
            raise KeyboardInterrupt
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("ctrl-c", ctrl_c_in_image_2)
    result = cli("generate", "a cat", *TINY, "--num-images", "3", "--backend", "ctrl-c", "-o", tmp_path, code=130)
    assert f"interrupted: 1 finished image kept in {tmp_path}; to make the rest, run the same command with " \
           "--resume --seed 7" in result.output


def test_ctrl_c_while_the_model_loads_is_130_and_one_line(cli, tmp_path, monkeypatch):
    from sdcli import models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load", interrupted)
    result = cli("generate", "a cat", *TINY, "-o", tmp_path / "out", code=130)
    assert result.output.strip() == "interrupted" and not (tmp_path / "out").exists()


def test_an_interrupted_bench_keeps_no_empty_plot(cli, tmp_path, monkeypatch, recwarn):
    from sdcli import benchmark

    def interrupted(self, config, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark.Runner, "point", interrupted)
    out = tmp_path / "bench"
    result = cli("bench", "-m", "tiny", "--steps", "1", "--batch-sizes", "1", "--backends", "sdpa", "--no-micro",
                 "-o", out, code=130)
    assert "interrupted: 0 of 3 configurations measured: nothing to keep" in result.output and not out.exists()
    result = cli("bench", "-m", "tiny", "--steps", "1", "--batch-sizes", "1", "--backends", "sdpa", "-o", out,
                 "--json", code=130)
    data = json.loads(result.stdout)
    assert data["plot"] is None and data["attention"] and json.loads(open(data["json"]).read())["attention"]
    assert [p.suffix for p in out.iterdir()] == [".json"] and "no plot" in result.stderr
    assert not [w for w in recwarn if "legend" in str(w.message)]


def test_the_readme_exit_codes_cover_every_exit_sdcli_makes():
    import sdcli
    from sdcli import errors  # noqa: F401 (every error class)

    def subclasses(cls):
        return {cls, *(s for c in cls.__subclasses__() for s in subclasses(c))}

    codes = {0, 130} | {c.exit_code for c in subclasses(sdcli.SdcliError)}  # done, Ctrl-C, and every error
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"## Exit status\n(.*?)\n## ", readme, re.S).group(1)
    assert codes == {int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)}


# ----- threads and caches -----------------------------------------------------------------------------------


def test_a_busy_machine_is_named_and_threads_can_be_set(cli, tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    try:
        torch.set_num_threads(2)
        result = cli("generate", "a cat", *TINY, "--backend", "sdpa", "-o", tmp_path / "a")
        assert "this machine is busy (load average 9.0" in result.output and "--threads 1" in result.output
        result = cli("generate", "a cat", *TINY, "--backend", "sdpa", "--threads", "1", "-o", tmp_path / "b")
        assert "machine is busy" not in result.output and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("where", ["a file", "under a file", "plans is a file", "no home"])
def test_a_cache_that_cannot_be_used_never_stops_a_run(cli, tmp_path, monkeypatch, where):
    from pathlib import Path

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    if where == "plans is a file":
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "plans").write_text("not a folder")
    cache = {"a file": blocker, "under a file": blocker / "cache", "plans is a file": tmp_path / "cache"}.get(where)
    if cache:
        monkeypatch.setenv("SDCLI_CACHE_DIR", str(cache))
    else:
        for name in ("SDCLI_CACHE_DIR", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home directory")))
        monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    data = cli.json("generate", "a cat", *TINY, "-o", tmp_path / "out")
    assert data["images"] and data["tuning"]["cached"] is False
    assert cli.json("doctor")["verdicts"]
