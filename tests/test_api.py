"""The public Python API (sdcli.route, unroute, doctor, compare), used the way the README shows it."""

import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, sdpa


def readme_example() -> str:
    """The README's Python example, exactly as written (it runs offline)."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.S).group(1)


def test_import_sdcli_loads_neither_torch_nor_diffusers():
    code = ("import sys, sdcli; sdcli.__version__, sdcli.SdcliError, sdcli.route, sdcli.Plan\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_readme_example_runs_as_written_and_counts_what_the_cli_counts(cli, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # offline: nothing may be fetched
    scope = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    plan, pipe = scope["plan"], scope["pipe"]
    model, prompt, steps = re.search(r'load\("(.+?)"\).*?pipe\("(.+?)", num_inference_steps=(\d+)\)', readme_example(),
                                     re.S).groups()
    assert str(plan.served()) in capsys.readouterr().out
    layers = plan.served()["layers"]
    assert plan.served()["backends"] and not any(b == "sdpa-math" for b in plan.served()["backends"])
    assert [type(p).__name__ for p in pipe.unet.attn_processors.values()] == ["AttnProcessor2_0"] * len(pipe.unet.attn_processors)

    # the same run through the CLI: the same layers, each called as often (auto's choice per shape is timed)
    data = cli.json("generate", prompt, "-m", model, "--steps", steps, "--seed", 0, "-o", tmp_path)
    by_cli = {l["layer"]: sum(l["calls"].values()) for l in data["attention"]["layers"]}
    assert {name: sum(calls.values()) for name, calls in layers.items()} == by_cli


def test_a_named_backend_serves_exactly_what_the_cli_reports(cli, tmp_path):
    import sdcli
    from sdcli.models import tiny

    pipe = tiny()
    plan = sdcli.route(pipe, backend="sdpa")
    pipe("a lighthouse", num_inference_steps=2)
    data = cli.json("generate", "a lighthouse", "-m", "tiny", "--steps", 2, "--seed", 0, "--backend", "sdpa",
                    "-o", tmp_path)
    # 14 UNet layers × 2 steps (CFG batched) + the VAE decoder's one
    assert plan.served()["backends"] == data["attention"]["served"] == {"sdpa": 14 * 2 + 1}
    assert plan.served()["layers"] == {l["layer"]: l["calls"] for l in data["attention"]["layers"]}
    assert json.loads(json.dumps(plan.to_json()["layers"])) == data["attention"]["layers"]
    sdcli.unroute(pipe)
    pipe("a lighthouse", num_inference_steps=1)
    assert plan.served()["backends"] == {"sdpa": 29}  # unrouted: nothing more counted


def test_route_refuses_what_it_cannot_do_in_one_line_in_the_apis_words(register_backend):
    import sdcli
    from sdcli.backends import head_dim_at_most
    from sdcli.errors import UnknownBackend
    from sdcli.models import tiny

    pipe = tiny()
    with pytest.raises(UnknownBackend, match="unknown attention backend 'nope'"):
        sdcli.route(pipe, backend="nope")
    with pytest.raises(sdcli.SdcliError) as no_gpu:  # can't run here at all: doctor's reason and fix
        sdcli.route(pipe, backend="sdpa-cudnn")
    assert "can't run here (needs a GPU)" in str(no_gpu.value) and "fix: run on a CUDA GPU" in str(no_gpu.value)
    register_backend("narrow", sdpa, [head_dim_at_most(16)])
    with pytest.raises(sdcli.SdcliError) as narrow:  # can't serve some layers: the parameter that lets others
        sdcli.route(pipe, backend="narrow")
    text = str(narrow.value)
    assert "can't serve layer" in text and "fallback=True" in text and 'backend="auto"' in text
    assert "--" not in text, text  # no CLI options in the API's words


def test_doctor_is_the_cli_report(cli):
    import sdcli

    api = sdcli.doctor()
    assert set(api) == {"report", "verdicts", "probe", "plans", "skipped_cache_files"}
    assert api["verdicts"] == cli.json("doctor")["verdicts"]


def test_compare_on_a_pipeline_keeps_its_routing(tmp_path):
    import sdcli
    from sdcli.models import tiny

    pipe = tiny()
    plan = sdcli.route(pipe, backend="sdpa")
    before = dict(pipe.unet.attn_processors)
    result = sdcli.compare(pipe, prompt="a lighthouse", seed=1, steps=2, backends=["sdpa-flash"])
    assert [(r["backend"], r["verdict"]) for r in result["rows"]] == [("sdpa-math", "reference"), ("sdpa-flash", "pass")]
    assert set(result["images"]) == {"sdpa-math", "sdpa-flash"}
    assert dict(pipe.unet.attn_processors) == before and plan.served()["backends"] == {}
    saved = sdcli.compare(pipe, prompt="a lighthouse", seed=1, steps=1, backends=["sdpa"], output_dir=tmp_path)
    assert (tmp_path / "compare-1.png").is_file() and saved["json"] == str(tmp_path / "compare-1.json")


def test_the_commands_are_api_functions_that_return_their_json(cli, tmp_path):
    """`sdcli.generate`, `sdcli.compare` (on a model name) and `sdcli.bench` take the commands' options by name and
    return what `--json` prints: the commands are their clients."""
    import sdcli

    tiny = {"steps": 1, "seed": 3, "backend": "sdpa"}
    made = sdcli.generate(["a cat"], "tiny", output_dir=tmp_path / "api", **tiny)
    printed = cli.json("generate", "a cat", "-m", "tiny", "--steps", 1, "--seed", 3, "--backend", "sdpa",
                       "-o", tmp_path / "cli")
    assert set(made) == set(printed)  # the API's device by default is None, the command's "auto": the same
    assert made["settings"] == {**printed["settings"], "output_dir": str(tmp_path / "api"), "device": None}
    assert [i["seed"] for i in made["images"]] == [3] and (tmp_path / "api" / made["images"][0]["file"]).is_file()
    compared = sdcli.compare("tiny", steps=1, backends=["sdpa"], output_dir=tmp_path / "cmp")
    assert [(r["backend"], r["verdict"]) for r in compared["rows"]] == [("sdpa-math", "reference"), ("sdpa", "pass")]
    assert compared["json"] == str(tmp_path / "cmp" / "compare-42.json")
    measured = sdcli.bench("tiny", batch_sizes=[1], steps=1, repeats=1, backends=["sdpa"], find_max=False,
                           micro=False)
    assert [row["name"] for row in measured["configs"]] == ["diffusers", "auto", "sdpa"] and "json" not in measured
    with pytest.raises(TypeError, match="unknown option: stepz"):
        sdcli.generate(["a cat"], "tiny", stepz=1)
