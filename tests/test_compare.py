"""`sdcli compare`: every backend from the same seed, with verdicts that follow each backend's promise."""

import json

import pytest
from PIL import Image

from conftest import make_plugin, sdpa

TINY = ["--model", "tiny", "--steps", "3", "--seed", "42"]


def rows_of(data):
    return {r["backend"]: r for r in data["rows"]}


def test_every_cpu_backend_passes_and_outputs_are_written(cli, tmp_path):
    data = cli.json("compare", *TINY, "-o", tmp_path)
    rows = rows_of(data)
    assert data["passed"] and data["reference"] == "sdpa-math"
    assert set(rows) == {"sdpa-math", "sdpa", "sdpa-flash", "flex"}
    assert rows["sdpa-math"]["verdict"] == "reference"
    for name in ("sdpa", "sdpa-flash", "flex"):
        r = rows[name]
        assert r["verdict"] == "pass" and r["kind"] == "exact", r
        k = r["kernel"]
        assert k["layers_measured"] == 15 and k["layers_na"] == 0  # 14 UNet layers and the VAE decoder's
        assert k["shapes_sampled"] == 5 and k["calls_outside_bound"] == 0  # and sampled inputs per layer shape
        assert k["max_ratio"] <= 2.0 and k["max_rel_error"] < 1e-5
        assert r["step_rel_error"] < 1e-4 and r["max_abs_diff"] <= 1 and r["ssim"] > 0.999
        assert r["served"] == {name: 14 * 3 + 1} and r["seconds"] > 0
    grid = Image.open(data["grid"])
    assert grid.size[0] == 4 * 256 and grid.size[1] > 2 * 256
    assert json.loads(open(data["json"]).read())["rows"] == json.loads(json.dumps(data["rows"]))


def test_wrong_backends_from_a_plugin_fail_by_name(cli, tmp_path, plugins):
    make_plugin(tmp_path, "badkernels", """
        import torch
        from sdcli.backends import Backend
        def sdpa(q, k, v, scale=None):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
        def no_scale(q, k, v, attn_mask=None, scale=None):
            return sdpa(q, k, v, scale=1.0)  # forgot the 1/sqrt(d)
        def shuffled_keys(q, k, v, attn_mask=None, scale=None):
            order = torch.randperm(k.shape[1], generator=torch.Generator().manual_seed(0)).to(k.device)
            return sdpa(q, k[:, order], v, scale=scale)  # keys no longer line up with values
        backends = [Backend("noscale", "attention without its scale", attention=no_scale),
                    Backend("shuffled", "keys shuffled", attention=shuffled_keys)]
    """, {"bad": "backends"})
    plugins(tmp_path)
    result = cli("compare", *TINY, "--backends", "sdpa,noscale,shuffled", "--json", "-o", tmp_path / "out", code=1)
    assert "2 backends broke their bound or failed: noscale, shuffled" in result.stderr
    rows = rows_of(json.loads(result.stdout))
    assert rows["sdpa"]["verdict"] == "pass"
    for name in ("noscale", "shuffled"):
        assert rows[name]["verdict"] == "FAIL" and rows[name]["kernel"]["max_ratio"] > 100, rows[name]
        assert "× rounding at " in rows[name]["why"] and "bound 2×" in rows[name]["why"]


def test_crashing_backends_are_reported_and_the_rest_still_run(cli, tmp_path, register_backend):
    def never(q, k, v, attn_mask=None, scale=None):
        raise RuntimeError("no kernel image is available for execution on the device")

    calls = {"n": 0}

    def midway(q, k, v, attn_mask=None, scale=None):
        calls["n"] += 1
        if calls["n"] > 20:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("never", never)
    register_backend("midway", midway)
    result = cli("compare", *TINY, "--backends", "never,sdpa,midway", "--json", "-o", tmp_path, code=1)
    rows = rows_of(json.loads(result.stdout))
    assert rows["sdpa"]["verdict"] == "pass"
    assert rows["never"]["verdict"] == "failed" and "no kernel image" in rows["never"]["why"]
    assert rows["midway"]["verdict"] == "failed" and "illegal memory access" in rows["midway"]["why"]


def test_exact_and_quantized_promises_have_their_own_bounds(cli, tmp_path, register_backend):
    def noisy(q, k, v, attn_mask=None, scale=None):  # about 1% relative error, like an int8 kernel
        out = sdpa(q, k, v, attn_mask, scale)
        noise = __import__("torch").randn(out.shape, generator=__import__("torch").Generator().manual_seed(1))
        return out + 0.01 * out.std() * noise

    def off_in_the_vae(q, k, v, attn_mask=None, scale=None):  # 20% off, only at the VAE's 64-wide head
        out = noisy(q, k, v, attn_mask, scale)
        return out if q.shape[-1] != 64 else out + 0.2 * (out - sdpa(q, k, v, attn_mask, scale)) / 0.01

    register_backend("noisy-exact", noisy, kind="exact")
    register_backend("noisy-quantized", noisy, kind="quantized")
    register_backend("vae-off", off_in_the_vae, kind="quantized")
    data = cli.json("compare", *TINY, "--backends", "noisy-exact,noisy-quantized,vae-off", "-o", tmp_path, code=1)
    rows = rows_of(data)
    assert rows["noisy-exact"]["verdict"] == "FAIL"
    assert rows["noisy-quantized"]["verdict"] == "pass" and rows["noisy-quantized"]["kind"] == "quantized"
    assert 0.005 < rows["noisy-quantized"]["kernel"]["max_rel_error"] < 0.1
    off = rows["vae-off"]  # judged per layer, on the captured activations and on sampled inputs
    assert off["verdict"] == "FAIL" and "bound 0.1 (2 of 20 calls outside it)" in off["why"]
    outside = {c["layer"] for c in off["kernel"]["per_layer"] if not c["within_bound"]}
    assert outside == {"vae.decoder.mid_block.attentions.0", "sampled 1×64 q256·kv256 fp32"}
    loose = cli.json("compare", *TINY, "--backends", "noisy-exact", "--exact-tol", "1e6", "-o", tmp_path)
    assert rows_of(loose)["noisy-exact"]["verdict"] == "pass"


def test_a_backend_that_takes_no_layer_of_the_model_is_not_a_failure(cli, tmp_path, register_backend):
    """Usable here, but no layer of this model has a shape it takes (sage1 on SD 1.5, whose heads are 40, 80, 160
    and 512 wide): nothing to judge, no kernel at fault. "n/a", exit 0. A kernel that raises at every layer still
    fails."""
    from sdcli.backends import head_dim_in

    def broken(q, k, v, attn_mask=None, scale=None):
        raise RuntimeError("no kernel image is available for execution on the device")

    register_backend("wide-only", sdpa, checks=[head_dim_in(64, 96, 128)])  # tiny's heads: 16, 32 and the VAE's 64
    register_backend("narrow-only", sdpa, checks=[head_dim_in(96, 128)])
    register_backend("broken", broken)
    data = cli.json("compare", *TINY, "--backends", "sdpa,narrow-only,wide-only", "-o", tmp_path)
    rows = rows_of(data)
    assert data["passed"] and rows["sdpa"]["verdict"] == "pass" and rows["wide-only"]["verdict"] == "pass"
    assert rows["narrow-only"]["verdict"] == "n/a"
    assert rows["narrow-only"]["why"] == ("takes no layer of this model (head dim 16 not in 96/128; head dim 32 not in "
                                          "96/128; head dim 64 not in 96/128)")
    failed = rows_of(cli.json("compare", *TINY, "--backends", "broken,sdpa-cudnn", "-o", tmp_path, code=1))
    assert failed["broken"]["verdict"] == "failed" and "no kernel image" in failed["broken"]["why"]
    assert failed["sdpa-cudnn"]["verdict"] == "failed"  # named, but not for this machine at all: not "n/a"
    assert failed["sdpa-cudnn"]["why"] == "served no attention call (can't run here: needs an NVIDIA GPU; this run is on the CPU)"


def test_interrupted_compare_keeps_what_it_finished_and_says_how_to_go_on(cli, tmp_path, register_backend):
    """Ctrl-C (or a time limit's SIGINT) during a backend's run: the backends before it are judged and saved, grid
    and JSON, the exit status is 130, and the message names the backends a second run needs."""
    def ctrl_c(q, k, v, attn_mask=None, scale=None):
        raise KeyboardInterrupt

    register_backend("ctrl-c", ctrl_c)
    result = cli("compare", *TINY, "--backends", "sdpa,ctrl-c,sdpa-flash", "--json", "-o", tmp_path, code=130)
    data = json.loads(result.stdout)
    assert [r["backend"] for r in data["rows"]] == ["sdpa-math", "sdpa"] and data["rows"][1]["verdict"] == "pass"
    assert data["interrupted"] == {"backends_done": 1, "backends_planned": 3, "left": ["ctrl-c", "sdpa-flash"]}
    assert not data["passed"] and json.loads(open(data["json"]).read())["rows"] == data["rows"]
    assert Image.open(data["grid"]).size[0] == 2 * 256
    assert (f"interrupted: 1 of 3 backends compared, kept in {data['json']} and {data['grid']}; to finish, run the "
            "same command with --backends ctrl-c,sdpa-flash") in " ".join(result.stderr.split())


def test_tables_and_never_overwrite(cli, tmp_path):
    first = cli("compare", *TINY, "--backends", "sdpa", "-o", tmp_path)
    assert "pass" in first.stdout and "against sdpa-math" in first.stdout
    cli("compare", *TINY, "--backends", "sdpa", "-o", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare-42-1.json", "compare-42-1.png",
                                                          "compare-42.json", "compare-42.png"]


@pytest.mark.parametrize("args, message", [
    (["--backends", "nope"], "unknown attention backend 'nope'"),
    (["--reference", "flash-attn"], "reference backend flash-attn can't run here"),
    (["--exact-tol", "0"], "must be positive"),
])
def test_bad_input(cli, tmp_path, args, message):
    result = cli("compare", *TINY, "-o", tmp_path, *args, code=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_gpu_compare_passes_in_half_precision(cli, tmp_path):
    data = cli.json("compare", *TINY, "--dtype", "fp16", "-o", tmp_path)
    exact = [r for r in data["rows"] if r["kind"] == "exact" and r["verdict"] != "reference"]
    assert exact and all(r["verdict"] == "pass" for r in exact), [(r["backend"], r["why"]) for r in exact]
