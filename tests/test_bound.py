"""The bound for exact kernels tells right from wrong in fp32, fp16 and bf16: planted faults, installed as a kernel
author's plug-in, fail `sdcli compare` (also on a model with sharp attention) and are never served by `auto`, and
every correct kernel passes. auto's tuner judges at batch 1, so a batch whose reference would not fit is no error."""

import json
from pathlib import Path

import pytest

from conftest import make_plugin, sdpa

PLANTED = Path(__file__).with_name("planted_faults.py")
FAULTS = ["scale-x1.01", "scale-x1.02", "last-key-dropped", "bias-0.4pct", "keys-shuffled"]
CORRECT = ["sdpa", "sdpa-flash", "flex"]
# The smallest images that still prove it: 64² makes 64-token and 16-token UNet layers and a 64-token VAE layer;
# every fault still fails (the sampled inputs decide, whatever the length), and a compare takes a third of 128²'s
SMALLEST = ["--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def sharp_tiny(tmp_path_factory):
    """The tiny model with its UNet's q and k projections × 4: logits 16× larger, up to about ±10 as in a
    trained model's attention, where a wrong softmax scale moves the result most."""
    import torch

    from sdcli.models import tiny

    pipe = tiny()
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                p.mul_(4)
    folder = tmp_path_factory.mktemp("models") / "tiny-sharp"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def planted(tmp_path, plugins):
    """The planted faults, installed as a kernel author's plug-in (entry points), in this process."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    make_plugin(folder, "planted_faults", PLANTED.read_text(), {"planted": "backends"})
    plugins(folder)


@pytest.mark.parametrize("dtype, model", [("bf16", "tiny"), ("fp16", "tiny"), ("fp32", "tiny"), ("bf16", "sharp")])
def test_planted_faults_fail_and_correct_kernels_pass(cli, dtype, model, planted, sharp_tiny, tmp_path):
    model = "tiny" if model == "tiny" else sharp_tiny
    result = cli("compare", "--seed", "42", "-m", model, "--dtype", dtype, "--steps", "1", *SMALLEST,
                 "--backends", ",".join(CORRECT + FAULTS), "--json", "-o", tmp_path / "out", code=1)
    assert f"{len(FAULTS)} backends broke their bound or failed: {', '.join(FAULTS)}" in result.stderr
    rows = {r["backend"]: r for r in json.loads(result.stdout)["rows"]}
    for name in CORRECT:
        assert rows[name]["verdict"] == "pass", rows[name]["why"]
    for name in FAULTS:
        assert rows[name]["verdict"] == "FAIL" and rows[name]["kernel"]["max_ratio"] > 2, rows[name]["why"]
        assert "× rounding at " in rows[name]["why"] and "bound 2×" in rows[name]["why"]


def test_auto_in_bf16_never_serves_a_planted_fault(cli, planted, tmp_path, monkeypatch):
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))
    data = cli.json("generate", "a cat", "-m", "tiny", "--dtype", "bf16", "--steps", "1", "--seed", "1", *SMALLEST,
                    "-o", tmp_path / "out")
    assert data["dtype"] == "bf16" and len(data["tuning"]["shapes"]) == 5
    for e in data["tuning"]["shapes"]:
        measured = {m["backend"]: m for m in e["measurements"]}
        assert set(FAULTS) <= set(measured)
        for fault in FAULTS:  # judged on two calls at batch 1: the layer's real inputs and sampled ones
            assert not measured[fault]["ok"] and "rounding, bound 2×" in measured[fault]["why"], measured[fault]
            assert measured[fault]["calls_checked"] == 2
        assert e["choice"] in ("sdpa", "sdpa-flash") and measured[e["choice"]]["ok"]
    assert set(data["attention"]["served"]) <= {"sdpa", "sdpa-flash"}


def test_tuning_at_a_batch_whose_reference_would_not_fit(cli, tmp_path, monkeypatch, register_backend):
    """The accuracy reference may hold one sample's scores only, as on a GPU where the fp32 scores of the whole
    batch would not fit: tuning at batch 3 (6 with guidance) still finds its plan. A candidate that runs out of
    memory at the run's batch is dropped from the plan, and the run goes on."""
    import torch

    from sdcli import numerics

    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))
    exact = numerics.reference_attention

    def one_sample_only(q, k, v, mask=None):
        if q.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (the reference may hold one sample's scores)")
        return exact(q, k, v, mask)

    def out_of_memory_above_batch_2(q, k, v, attn_mask=None, scale=None):
        if q.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return sdpa(q, k, v, attn_mask, scale)

    monkeypatch.setattr(numerics, "reference_attention", one_sample_only)
    register_backend("oomy", out_of_memory_above_batch_2)
    data = cli.json("generate", "a cat", "-m", "tiny", "--steps", "1", "--batch-size", "3", "--num-images", "3",
                    "--seed", "1", "-o", tmp_path)
    assert len(data["images"]) == 3 and {e["shape"]["batch"] for e in data["tuning"]["shapes"]} == {6, 3}
    for e in data["tuning"]["shapes"]:
        measured = {m["backend"]: m for m in e["measurements"]}
        assert measured["sdpa"]["ok"] and measured["sdpa-flash"]["ok"] and e["choice"] in ("sdpa", "sdpa-flash")
        assert not measured["oomy"]["ok"] and "OutOfMemoryError" in measured["oomy"]["error"]


@pytest.mark.gpu
def test_gpu_kernels_are_judged_and_timed_on_the_runs_device():
    import torch

    from sdcli import backends, timing
    from sdcli.backends import Shape

    device = f"cuda:{torch.cuda.device_count() - 1}"  # with several GPUs, not the default one
    rows = timing.measure([backends.get("sdpa"), backends.get("sdpa-math")], Shape(8, 40, 1024, 1024, "bf16"),
                          device, batch=2)
    assert all(r["ok"] and r["ms"] > 0 and r["calls_timed"] >= 5 for r in rows), rows
