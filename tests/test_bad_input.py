"""Nothing gets past sdcli unjudged: bad option values and usage errors, saved reports of the wrong shape, damaged
files in auto's plan cache, a size given on one side only, and `--resume` with other settings."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPORTS, Cli, run_sdcli
from sdcli.images import read_parameters, read_recipe


H100 = json.loads((REPORTS / "h100.json").read_text())


def one_line(stderr: str, message: str) -> None:
    assert message in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


# Options that keep a run tiny should a check below ever let its bad value through; the value under test comes
# after them, so it wins.
CHEAP = {"generate": ["--model", "tiny", "--steps", "1", "--no-tune"], "compare": ["--model", "tiny", "--steps", "1"],
         "bench": ["--model", "tiny", "--steps", "1", "--batch-sizes", "1", "--repeats", "1", "--no-find-max",
                   "--no-micro"]}


def command(args, folder) -> list:
    return [args[0], *CHEAP[args[0]], "-o", folder, *args[1:]] if args[0] in CHEAP else list(args)


# The rows of issue 16's table, through the real process boundary.
@pytest.mark.parametrize("args, message", [
    (["generate", "a cat", "--guidance", "nan"], "Invalid value for '--guidance': must be a finite number, not nan"),
    (["generate", "a cat", "--guidance", "inf"], "Invalid value for '--guidance': must be a finite number, not inf"),
    (["generate", "a cat", "--steps", "abc"], "Invalid value for '--steps'"),
    (["compare", "--exact-tol", "nan"], "Invalid value for '--exact-tol': must be a finite number, not nan"),
    (["doctor", "--device", "cuda:x"], "--device must be cpu, cuda or cuda:N, not 'cuda:x'"),
    (["doctor", "--report", "WRONG_TYPES"], "is not a valid sdcli report: packages: expected an object, found a list"),
])
def test_table_rows_are_one_line_and_exit_2(tmp_path, args, message):
    wrong = tmp_path / "report.json"
    wrong.write_text(json.dumps({**H100, "packages": []}))
    result = run_sdcli(*command([wrong if a == "WRONG_TYPES" else a for a in args], tmp_path))
    assert result.returncode == 2, result.stderr
    one_line(result.stderr, message)


# Every input of the same kind, in-process: numbers parse strictly, lists are not empty, usage errors are one line.
@pytest.mark.parametrize("args, message", [
    (["generate", "a cat", "--guidance", "-inf"], "must be a finite number, not -inf"),
    (["generate", "a cat", "--guidance", "1e400"], "must be a finite number, not inf"),
    (["generate", "a cat", "--steps", "1.5"], "Invalid value for '--steps'"),
    (["generate", "a cat", "--seed", "x"], "Invalid value for '--seed'"),
    (["generate", "a cat", "--width", ""], "Invalid value for '--width'"),
    (["generate", "a cat", "--bogus"], "No such option: --bogus"),
    (["generate", "a cat", "--steps"], "Option '--steps' requires an argument"),
    (["generate", "a cat", "a dog"], "unexpected extra argument"),
    (["generate", "a cat", "--model", ""], "--model is empty"),
    (["generate", "a cat", "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, not 'gpu'"),
    (["compare", "--quantized-tol", "inf"], "Invalid value for '--quantized-tol': must be a finite number"),
    (["compare", "--guidance", "nan"], "Invalid value for '--guidance': must be a finite number"),
    (["compare", "--backends", ""], "--backends needs at least one name, not ''"),
    (["compare", "--backends", " , "], "--backends needs at least one name, not ' , '"),
    (["compare", "--seed", "1e3"], "Invalid value for '--seed'"),
    (["bench", "--guidance", "inf"], "Invalid value for '--guidance': must be a finite number"),
    (["bench", "--batch-sizes", ","], "--batch-sizes needs positive numbers, not ','"),
    (["bench", "--batch-sizes", ""], "--batch-sizes needs positive numbers, not ''"),
    (["bench", "--backends", ","], "--backends needs at least one name, not ','"),
    (["bench", "--repeats", "many"], "Invalid value for '--repeats'"),
    (["doctor", "--device", ""], "--device must be cpu, cuda or cuda:N, not ''"),
    (["doctor", "--dtype", ""], "--dtype must be one of fp32, fp16, bf16, not ''"),
    (["doctor", "--device", "cuda:1", "--report", REPORTS / "h100.json"], "--device cuda:1: there is no GPU 1 (GPUs: 0)"),
    (["doctor", "--device", "cuda", "--report", REPORTS / "cpu.json"], "--device cuda: there is no GPU 0 (GPUs: none)"),
    (["doctor", "--probe", "extra"], "unexpected extra argument"),
    (["doctor", "--family", "sd9"], "--family 'sd9' matches none of: SD 1.x 512², SD 2.x 768², SDXL 1024²"),
    (["nosuch"], "No such command 'nosuch'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_bad_values_and_usage_errors_are_one_line_and_exit_2(cli, tmp_path, args, message):
    result = cli(*command(args, tmp_path), code=2)
    one_line(result.stderr, message)


def test_python_api_refuses_what_the_options_refuse(tmp_path):
    from sdcli import SdcliError
    from sdcli.comparison import Thresholds
    from sdcli.options import Options

    with pytest.raises(SdcliError, match="--guidance must be a finite number"):
        Options.make(prompts=["a cat"], guidance=float("nan"), output_dir=tmp_path).validate()
    with pytest.raises(SdcliError, match="--exact-tol and --quantized-tol must be positive, finite"):
        Thresholds(exact_tol=float("inf"))


@pytest.mark.parametrize("change, field", [
    ({"gpus": [[0]]}, "gpus[0]: expected an object, found a list"),
    ({"gpus": [{"index": "0", "name": "H100"}]}, "gpus[0].index: expected a whole number, found the text '0'"),
    ({"gpus": [{"index": 0}]}, "gpus[0].name: missing"),
    ({"gpus": [{**H100["gpus"][0], "compute_capability": 9.0}]}, "gpus[0].compute_capability: expected a compute"),
    ({"packages": {**H100["packages"], "torch": {"version": 2.7}}}, "packages.torch.version: expected text or null"),
    ({"packages": {"flash_attn": "2.7"}}, "packages.flash_attn: expected an object, found the text '2.7'"),
    ({"torch": {"cuda_available": "yes"}}, "torch.cuda_available: expected true or false or null"),
    ({"torch": {"flash_attention_impls": "FA3"}}, "torch.flash_attention_impls: expected a list, found the text 'FA3'"),
    ({"dtypes": {"device": "cuda:0", "bf16": True}}, "dtypes.bf16: expected an object, found true"),
    ({"system": None}, "system: expected an object, found null"),
    ({"nvml": {"driver": 570}}, "nvml.driver: expected text or null, found the number 570"),
])
def test_saved_report_of_wrong_types_names_the_field(cli, tmp_path, change, field):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"report": {**H100, **change}, "verdicts": {}}))  # as `sdcli doctor --json` saves it
    result = cli("doctor", "--report", path, code=2)
    one_line(result.stderr, f"{path} is not a valid sdcli report: {field}")


@pytest.mark.parametrize("given, size", [(["--width", "64"], (64, 128)), (["--height", "64"], (128, 64))])
def test_one_side_of_the_size_is_honoured_and_the_recipe_says_what_was_made(cli, tmp_path, given, size):
    data = cli.json("generate", "a cat", "--model", "tiny", "--steps", "1", "--seed", "1", "--no-tune", *given,
                    "-o", tmp_path)
    path = data["images"][0]["file"]
    with Image.open(path) as im:
        assert im.size == size
    assert read_parameters(path)["Size"] == f"{size[0]}x{size[1]}"
    assert (read_recipe(path)["width"], read_recipe(path)["height"]) == size == (data["width"], data["height"])


# ----- auto's plan cache: advisory, never fatal -----------------------------------------------------------


@pytest.fixture(scope="module")
def measured_plan(tmp_path_factory):
    """A plan file measured once for the run below (tiny model, 1 step), to damage in each test."""
    cache = tmp_path_factory.mktemp("cache")
    return Path(Cli().json(*PLAN_RUN, "-o", cache / "out", env={"SDCLI_CACHE_DIR": str(cache)})["tuning"]["path"])


PLAN_RUN = ["generate", "a cat", "--model", "tiny", "--steps", "1", "--seed", "1"]


def random_bytes(path):
    path.write_bytes(bytes(range(256)) * 4)


def json_list(path):
    path.write_text("[1, 2, 3]")


def wrong_types(path):  # this run's own key, so only the types say it is not a plan
    plan = json.loads(path.read_text())
    plan["shapes"][0]["measurements"] = [{"backend": "sdpa", "ok": "yes"}]
    path.write_text(json.dumps(plan))


def folder(path):
    path.unlink()
    path.mkdir()


def unreadable(path):  # a link to itself: unreadable even for root, whom chmod doesn't stop
    path.unlink()
    os.symlink(path.name, path)


@pytest.mark.parametrize("damage, why", [
    (random_bytes, "not text"),
    (json_list, "not an sdcli plan: the document: expected an object, found a list"),
    (wrong_types, "not an sdcli plan: shapes[0].measurements[0].ok: expected true or false, found the text 'yes'"),
    (folder, "a folder, not a plan"),
    (unreadable, "unreadable: Too many levels of symbolic links"),
])
def test_damaged_plan_is_listed_by_doctor_then_measured_again_and_replaced(cli, tmp_path, monkeypatch, measured_plan,
                                                                         damage, why):
    plans = tmp_path / "plans"
    plans.mkdir()
    path = plans / measured_plan.name
    shutil.copy(measured_plan, path)
    damage(path)
    (plans / "notes.json").write_text('{"not": "a plan"}')  # a foreign file: skipped, left alone
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path))

    doctor = cli.json("doctor")
    assert doctor["skipped_cache_files"] == [{"path": str(path), "why": why},
                                             {"path": str(plans / "notes.json"), "why": "not an sdcli plan: key: missing"}]
    assert f"Skipped in auto's plan cache: {path}: {why}" in cli("doctor").stdout

    data = cli.json(*PLAN_RUN, "-o", tmp_path / "out")
    assert data["tuning"]["cached"] is False and data["tuning"]["path"] == str(path)  # measured again
    if damage is folder:  # not sdcli's to delete: the plan serves this run unsaved, and says so
        assert data["tuning"]["not_saved"] == "Is a directory" and path.is_dir()
    else:
        assert json.loads(path.read_text())["key"] == data["tuning"]["key"]  # replaced
        assert cli.json(*PLAN_RUN, "-o", tmp_path / "out")["tuning"]["cached"] is True
        assert [f["path"] for f in cli.json("doctor")["skipped_cache_files"]] == [str(plans / "notes.json")]


# ----- --resume: done means made with every setting that changes the pixels ---------------------------------


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    Cli()(*RESUME_RUN, "-o", out)
    return out


RESUME_RUN = ["generate", "a cat", "--model", "tiny", "--steps", "1", "--seed", "5", "--no-tune"]


@pytest.mark.parametrize("changed, setting, theirs, ours", [
    (["--width", "64"], "width", None, 64),
    (["--height", "64"], "height", None, 64),
    (["--batch-size", "2"], "batch_size", 1, 2),
    (["--dtype", "bf16"], "dtype", "'auto'", "'bf16'"),
    (["--vae-dtype", "fp32"], "vae_dtype", "'auto'", "'fp32'"),
    (["--device", "cpu"], "device", "'auto'", "'cpu'"),
    (["--backend", "sdpa"], "backend", "'auto'", "'sdpa'"),
    (["--fallback"], "fallback", False, True),
    (["--quantized"], "quantized", False, True),
    (["--tune"], "tune", False, True),
    (["--fuse-qkv"], "fuse_qkv", False, True),
    (["--channels-last"], "channels_last", False, True),
    (["--compile"], "compile", False, True),
    (["--compile-vae"], "compile_vae", False, True),
    (["--no-tf32"], "tf32", True, False),
    (["--cudnn-benchmark"], "cudnn_benchmark", False, True),
    (["--model", "sd15-arch"], "model", "'tiny'", "'sd15-arch'"),
])
def test_resume_counts_an_image_done_only_when_every_pixel_setting_matches(cli, first_run, changed, setting, theirs,
                                                                           ours):
    [image] = first_run.glob("*.png")
    result = cli(*RESUME_RUN, *changed, "-o", first_run, "--resume", code=2)
    assert f"--resume: {image} was made with {setting} {theirs}, this run has {ours}" in result.output
    assert [p.name for p in first_run.glob("*.png")] == [image.name]  # nothing made, nothing removed


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`sdcli doctor --json | head`: output to a closed pipe is no error and no traceback, as rich and click do."""
    proc = subprocess.Popen([sys.executable, "-m", "sdcli", "doctor", "--report", REPORTS / "h100.json", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before sdcli writes a byte
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and stderr == "", stderr
