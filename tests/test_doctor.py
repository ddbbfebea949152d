"""`sdcli doctor`: the machine report, verdicts for saved reports of real GPU types, and bad input."""

import json
import subprocess
import sys

import pytest

from conftest import REPORTS, ROOT, make_plugin, run_sdcli


def verdicts(cli, name):
    data = cli.json("doctor", "--report", REPORTS / f"{name}.json")
    return {row["backend"]: row for row in data["verdicts"]["backends"]}, data


def test_doctor_on_this_machine_json(cli):
    data = cli.json("doctor")
    report = data["report"]
    assert report["schema"] == "sdcli.report/1"
    assert {"os", "python", "cpu", "ram_gb"} <= set(report["system"])
    assert report["packages"]["torch"]["import_ok"] is True
    assert report["packages"]["diffusers"]["version"]
    assert report["dtypes"]["fp16"]["how"] == "measured"
    rows = data["verdicts"]["backends"]
    names = [r["backend"] for r in rows]
    assert len(names) == len(set(names))
    assert {"sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex", "flash-attn",
            "flash-attn-3", "xformers", "sage"} <= set(names)
    for r in rows:
        assert r["status"] in ("usable", "not installed", "needs a GPU", "unsupported on this GPU", "wrong version",
                               "broken install")
        if r["status"] != "usable":
            assert r["reason"] and r["fix"], r
    assert next(r for r in rows if r["backend"] == "sdpa")["status"] == "usable"


def test_doctor_tables_exit_zero(cli):
    result = cli("doctor")
    for title in ("Machine", "Packages", "Attention backends"):
        assert title in result.stdout


def test_t4_refuses_flash_and_explains(cli):
    v, data = verdicts(cli, "t4")
    assert data["verdicts"]["dtype"] == "fp16"  # no bf16 on a T4
    assert v["flash-attn"]["status"] == "unsupported on this GPU"
    assert "SM80" in v["flash-attn"]["reason"] and "Tesla T4 (SM75)" in v["flash-attn"]["reason"]
    assert v["sdpa-flash"]["status"] == "unsupported on this GPU"
    assert v["sdpa-efficient"]["status"] == "usable"  # what serves a T4
    assert v["xformers"]["status"] == "broken install"
    assert "built for torch 2.7.0" in v["xformers"]["reason"] and "2.5.1" in v["xformers"]["reason"]
    assert v["sage"]["status"] == "wrong version" and "1.0.6" in v["sage"]["reason"]
    assert "pip install -U 'sageattention>=2.1.1'" in v["sage"]["fix"]


def test_diffusers_own_requirement_check_decides(cli, tmp_path):
    """FlashAttention-3 imports as flash_attn_interface, but diffusers wants a findable flash_attn_3 module: where
    diffusers' own check refuses a backend, so does sdcli, with diffusers' words (no TypeError at the first call)."""
    report = json.loads((REPORTS / "h100.json").read_text())
    message = ("Flash Attention 3 backend '_flash_3' is not usable because of missing package or the version is "
               "too old. Please build FA3 beta release from source.")
    report["diffusers_backends"]["_flash_3"] = message
    path = tmp_path / "h100-fa3-unseen.json"
    path.write_text(json.dumps(report))
    v = {r["backend"]: r for r in cli.json("doctor", "--report", path)["verdicts"]["backends"]}
    assert v["flash-attn-3"]["status"] == "wrong version" and message in v["flash-attn-3"]["reason"]
    assert "flash_attn_3 3.0.0b1 is installed, but diffusers can't use it" in v["flash-attn-3"]["reason"]
    assert v["flash-attn-3"]["fix"] == "build FA3 beta release from source."
    assert v["flash-attn"]["status"] == "usable"


def test_a100_sage_cannot_serve_head_dim_160(cli):
    v, _ = verdicts(cli, "a100")
    sage = v["sage"]
    assert sage["status"] == "usable"
    sd1 = sage["serves"]["SD 1.x 512²"]
    assert sd1["ok"] == 3 and sd1["of"] == 5 and sd1["refused"] == ["head dim 160 > 128"]
    assert sage["serves"]["SDXL 1024²"]["ok"] == sage["serves"]["SDXL 1024²"]["of"]
    assert v["flash-attn"]["serves"]["VAE 512²"] == {"ok": 0, "of": 1, "refused": ["head dim 512 > 256"]}
    assert v["xformers"]["status"] == "wrong version" and "0.0.28.post3" in v["xformers"]["reason"]
    assert v["flash-attn-3"]["status"] == "not installed"


@pytest.mark.parametrize("name, fp8_backend, status", [
    ("a100", "sage-fp8", "unsupported on this GPU"),  # SM80: no fp8
    ("rtx4090", "sage-fp8", "usable"),                 # SM89: fp8
    ("h100", "sage-fp8-sm90", "usable"),
    ("h100", "sage-fp8", "unsupported on this GPU"),   # the SM90 kernel is a different backend
    ("rtx4090", "sage-fp8-sm90", "unsupported on this GPU"),
])
def test_fp8_only_on_sm89_and_newer(cli, name, fp8_backend, status):
    v, data = verdicts(cli, name)
    assert v[fp8_backend]["status"] == status
    if name == "a100":
        assert "fp8" in v[fp8_backend]["reason"] and "SM89+" in v[fp8_backend]["reason"]
        assert data["report"]["dtypes"]["fp8_e4m3"]["supported"] is False


def test_h100_everything_installed_is_usable(cli):
    v, data = verdicts(cli, "h100")
    assert data["verdicts"]["dtype"] == "bf16"
    for name in ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flash-attn", "flash-attn-3", "xformers", "sage"):
        assert v[name]["status"] == "usable", v[name]
    assert v["flash-attn-3"]["origin"] == "sdcli"
    assert v["flash-attn"]["serves"]["SD 1.x 512²"]["ok"] == 5


def test_cpu_report_only_cpu_kernels(cli):
    v, data = verdicts(cli, "cpu")
    assert data["verdicts"]["dtype"] == "fp32"
    usable = {n for n, r in v.items() if r["status"] == "usable"}
    assert usable == {"sdpa", "sdpa-flash", "sdpa-math", "flex"}
    assert "needs an NVIDIA GPU" in v["sdpa-cudnn"]["reason"]


def test_saved_doctor_json_reads_back_with_same_verdicts(cli, tmp_path):
    saved = tmp_path / "mine.json"
    saved.write_text(cli("doctor", "--json").stdout)
    again = cli.json("doctor", "--report", saved)
    first = json.loads(saved.read_text())
    assert again["verdicts"] == first["verdicts"]


@pytest.mark.parametrize("content, message", [
    (None, "cannot read report"),
    ("not json {", "is not a JSON report"),
    ('{"hello": 1}', "is not an sdcli report"),
])
def test_bad_report_is_one_line_and_exit_2(cli, tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    result = cli("doctor", "--report", path, code=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_probe_and_report_cannot_combine(cli):
    result = cli("doctor", "--probe", "--report", REPORTS / "h100.json", code=2)
    assert "can't be combined" in result.output


def test_probe_runs_usable_backends_against_fp32(cli):
    data = cli.json("doctor", "--probe", "--family", "VAE")  # its one shape keeps it quick; every family by default
    probed = {r["backend"] for r in data["probe"]}
    usable = {r["backend"] for r in data["verdicts"]["backends"] if r["status"] == "usable"}
    assert probed == usable
    for r in data["probe"]:
        assert r["ok"] and r["rel_error"] < 1e-5 and r["ms"] > 0, r  # fp32 on CPU: rounding only
    # the VAE's self-attention alone, its sequence capped at 1024 on the CPU
    assert {r["shape"] for r in data["probe"]} == {"1×512 q1024·kv1024 fp32"}
    assert all(set(r["serves"]) == {"VAE 512²"} for r in data["verdicts"]["backends"] if r["serves"])


def test_interrupted_probe_keeps_the_shapes_it_measured_and_says_how_to_go_on(cli, register_backend):
    """Ctrl-C (or a time limit's SIGINT) at the probe's second shape: the first shape's rows are printed (JSON too),
    the exit status is 130, and the message says which --family runs finish the job."""
    from conftest import sdpa
    from sdcli.diagnosis import FAMILY_OPTIONS, REFERENCE_SHAPES, reference_shapes

    def ctrl_c_at_80(q, k, v, attn_mask=None, scale=None):
        if q.shape[-1] == 80:
            raise KeyboardInterrupt
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("ctrl-c", ctrl_c_at_80)
    result = cli("doctor", "--probe", "--family", "sd1", "--json", code=130)
    data = json.loads(result.stdout)
    assert {r["shape"] for r in data["probe"]} == {"8×40 q1024·kv1024 fp32"}
    assert data["probe_interrupted"] == {"shapes_done": 1, "shapes_planned": 3, "families_left": ["sd1"]}
    assert ("interrupted: the probe measured 1 of 3 shapes (kept in the output above); to finish, run sdcli doctor "
            "--probe --family sd1") in " ".join(result.stderr.split())
    for family in REFERENCE_SHAPES:  # each suggested --family picks that family alone
        assert list(reference_shapes(FAMILY_OPTIONS[family].strip("'"))) == [family]


def test_plugin_backend_from_entry_point_and_broken_plugin(tmp_path):
    """A package that declares an `sdcli.backends` entry point shows up in doctor; a broken one is reported."""
    env = make_plugin(tmp_path, "mykernel", """
        import torch
        from sdcli.backends import Backend, head_dim_at_most
        def attention(q, k, v, attn_mask=None, scale=None):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
        backend = Backend("my-kernel", "a kernel author's attention", attention=attention,
                          checks=[head_dim_at_most(64)])
        def broken():
            raise RuntimeError("kernel library missing")
    """, {"my-kernel": "backend", "bad-kernel": "broken"})
    result = run_sdcli("doctor", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {r["backend"]: r for r in json.loads(result.stdout)["verdicts"]["backends"]}
    assert rows["my-kernel"]["origin"] == "mykernel" and rows["my-kernel"]["status"] == "usable"
    assert rows["my-kernel"]["serves"]["SD 1.x 512²"]["refused"] == ["head dim 80 > 64", "head dim 160 > 64"]
    assert rows["bad-kernel"]["status"] == "broken install"
    assert "kernel library missing" in rows["bad-kernel"]["reason"]


def test_help_imports_nothing_heavy():
    """`sdcli --help` must stay fast: torch and diffusers load only inside the commands that use them."""
    code = ("import sys; from sdcli.cli import app\n"
            "try: app(['--help'], prog_name='sdcli')\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_completion_scripts_are_current_and_complete_commands():
    check = subprocess.run([sys.executable, "scripts/completions.py", "--check"], cwd=ROOT, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    result = run_sdcli(env={"_SDCLI_COMPLETE": "complete_bash", "COMP_WORDS": "sdcli doc", "COMP_CWORD": "1"})
    assert result.stdout.split() == ["doctor"]


def test_autos_documented_order_is_the_declared_ranks():
    """--no-tune's order comes from the backends' declared ranks, and is the order docs/usage.md documents."""
    import re

    from sdcli import backends
    from sdcli.hardware import Machine

    table = dict(re.findall(r"^  \| (NVIDIA GPU|CPU) \| ([^|(]+)", (ROOT / "docs" / "usage.md").read_text(), re.M))
    gpu = Machine(json.loads((REPORTS / "h100.json").read_text()))
    cpu = Machine(json.loads((REPORTS / "cpu.json").read_text()))
    assert backends.auto_order(gpu) == table["NVIDIA GPU"].strip().split(" → ")
    assert backends.auto_order(cpu) == table["CPU"].split() == ["sdpa"]
    assert backends.auto_order(gpu, quantized=True) == ["sage-fp8-sm90", "sage-fp8", "sage", "sage1",
                                                        *backends.auto_order(gpu)]
