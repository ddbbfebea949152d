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


def test_a_small_kernel_is_timed_on_the_device_clock_not_the_host(monkeypatch):
    """On a GPU a small kernel (here 1 µs) ends long before Python has launched the next (here 30 µs): events around
    back-to-back calls would time the Python. The GPU is simulated (the boundary that needs one): work queued on it
    starts when it is free and not before it was queued; events, synchronize and _sleep act on that timeline."""
    import contextlib
    import time

    import torch

    from sdcli import timing

    gpu = {"free": 0.0}  # when the queued work ends, on the host's clock

    def queue(seconds):
        gpu["free"] = max(gpu["free"], time.perf_counter()) + seconds

    def wait():
        while time.perf_counter() < gpu["free"]:
            pass

    class Event:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self, stream=None):
            queue(0.0)
            self.at = gpu["free"]

        def elapsed_time(self, other):
            return (other.at - self.at) * 1e3

        synchronize = staticmethod(wait)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: wait())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: queue(cycles / 1.5e9))
    monkeypatch.setattr(timing, "_HOLD", {})
    monkeypatch.setattr(timing, "_CYCLES_PER_SECOND", {})

    def small_kernel():
        launched = time.perf_counter() + 30e-6
        while time.perf_counter() < launched:
            pass
        queue(1e-6)

    assert timing.per_call(small_kernel, 50, "cuda:0") == pytest.approx(1e-6, rel=0.01)


def test_peak_memory_counts_what_cuda_graphs_hold(monkeypatch):
    """A CUDA graph's working memory is reserved in its private pool at capture and reused by every replay without
    the allocator counting it as allocated: the peak of a reduce-overhead run adds it. The allocator's state is
    faked (the GPU boundary), in the layout torch.cuda.memory_snapshot documents."""
    import torch

    from sdcli import devices

    gib = 2**30
    segments = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 3 * gib, "allocated_size": 2 * gib},  # cache: not use
        {"device": 0, "segment_pool_id": (1, 0), "total_size": 3 * gib // 2, "allocated_size": gib // 2},  # a graph
        {"device": 1, "segment_pool_id": (1, 0), "total_size": 8 * gib, "allocated_size": 0},  # another GPU's
    ]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda **kwargs: segments)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    with devices.peak_memory("cuda:0") as peak:
        pass
    assert peak.gb == 3.0


@pytest.mark.gpu
def test_gpu_a_small_kernel_is_timed_on_the_device_clock():
    """A 64-token attention takes microseconds on the GPU, less than the Python that launches it: its time per call
    on the device's clock is below the host's time per call (which events around the calls would have reported)."""
    import time

    import torch

    from sdcli import backends, timing

    q, k, v = (torch.randn(1, 64, 1, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    sdpa_ = backends.get("sdpa")
    fn = lambda: sdpa_.run(q, k, v)  # noqa: E731
    fn()
    device = timing.per_call(fn, 50, "cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        fn()
    host = (time.perf_counter() - t0) / 50
    torch.cuda.synchronize()
    assert 0 < device < host, (device, host)
