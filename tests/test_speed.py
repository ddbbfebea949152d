"""Speed options at full strength: compiled runs count exactly like eager ones, compile at most once per batch
size, hand dynamo graphs that mutate none of their inputs (so CUDA graphs stay possible), and bench keeps
the attention gain and the options' gain apart. (Host time per call is measured by
scripts/attention_overhead.py, not by a timed test.)"""

import json

import pytest
import torch

from conftest import sdpa
from sdcli import images, pipeline, speed

CALLS_PER_BATCH = 14 * 2 + 1  # 14 UNet attention layers × 2 steps (whole batch and CFG in one call) + the VAE's
BATCH_SIZES = (1, 2, 3, 4, 5)


class Recorder:
    """A torch.compile backend that keeps every graph dynamo hands over and runs it as it is: dynamo's tracing,
    guards and recompiles are real, without inductor's minutes of C++ compilation on a 2-core CPU."""

    def __init__(self):
        self.graphs, self.modes = [], []

    def __call__(self, gm, example_inputs, **kwargs):
        self.graphs.append(gm)
        return gm.forward


def recording(monkeypatch) -> Recorder:
    import torch._dynamo

    recorder, real = Recorder(), torch.compile

    def compile(fn, mode=None, **kwargs):
        recorder.modes.append(mode)
        return real(fn, backend=recorder, **kwargs)

    monkeypatch.setattr(torch, "compile", compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return recorder


def mutated_inputs(gm) -> list[str]:
    """Graph inputs that an in-place op (add_, copy_, ...) writes to."""
    inputs = {n for n in gm.graph.nodes if n.op == "placeholder"}
    name = lambda n: n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")  # noqa: E731
    return sorted(n.args[0].name for n in gm.graph.nodes if n.op in ("call_method", "call_function")
                  and n.args and n.args[0] in inputs and name(n).endswith("_") and not name(n).startswith("_"))


def run_batches(tmp_path, compiled: bool) -> pipeline.Run:
    """Batches of 1..5 images, two of each size, through one prepared pipeline; compiled: UNet and VAE decode.
    (The VAE decodes once per batch: its first call at a size runs eagerly, the second compiled.)"""
    settings = pipeline.Settings(prompts=["a cat"], model="tiny", steps=2, seed=1, backend="sdpa",
                                 num_images=2 * sum(BATCH_SIZES), compile=compiled, compile_vae=compiled,
                                 output_dir=tmp_path / ("compiled" if compiled else "eager"))
    run = pipeline.prepare(settings)
    items = pipeline.work_items(settings)
    for b in sorted(2 * BATCH_SIZES):
        run.settings.batch_size = b
        batch, items = items[:b], items[b:]
        pipeline.generate(run, batch)
    return run


@pytest.fixture(scope="module")
def compiled_and_eager(tmp_path_factory):
    from torch._dynamo.utils import counters

    tmp = tmp_path_factory.mktemp("speed")
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = recording(monkeypatch)
        compiled = run_batches(tmp, compiled=True)
        stats = {"frames": dict(counters["frames"]), "graph_breaks": dict(counters["graph_break"])}
    torch._dynamo.reset()
    return compiled, run_batches(tmp, compiled=False), recorder, stats


def test_compiled_generate_counts_like_eager_and_compiles_at_most_once_per_batch_size(compiled_and_eager):
    compiled, eager, recorder, stats = compiled_and_eager
    assert [dict(l.served()) for l in compiled.router.layers] == [dict(l.served()) for l in eager.router.layers]
    assert compiled.router.served() == {"sdpa": CALLS_PER_BATCH * 2 * len(BATCH_SIZES)}
    assert stats["graph_breaks"] == {}  # routing traced whole: its first-call path never is
    unet = [g for g in recorder.graphs if any("time_embedding" in n.name for n in g.graph.nodes)]
    vae = [g for g in recorder.graphs if any("post_quant_conv" in n.name for n in g.graph.nodes)]
    assert len(unet) + len(vae) == len(recorder.graphs) == stats["frames"]["ok"]
    assert 1 <= len(unet) <= len(BATCH_SIZES) and 1 <= len(vae) <= len(BATCH_SIZES)
    assert set(recorder.modes) == {"default"}


def test_compiled_graphs_mutate_no_input(compiled_and_eager):
    """Inductor skips CUDA graphs for a graph that writes to its (non-static) inputs: sdcli's counting must not."""
    _, _, recorder, _ = compiled_and_eager
    assert recorder.graphs and [mutated_inputs(g) for g in recorder.graphs] == [[]] * len(recorder.graphs)


def test_bench_separates_the_gains_and_says_cpu_has_no_cuda_graphs(cli, tmp_path, monkeypatch):
    recorder = recording(monkeypatch)
    text = cli("bench", "-m", "tiny", "--compile", "--compile-mode", "reduce-overhead", "--batch-sizes", "1,2",
               "--steps", "2", "--repeats", "1", "--backends", "sdpa", "--no-micro", "--no-find-max",
               "-o", tmp_path).stdout
    assert "CUDA graphs, which need a CUDA GPU: compiled in default mode" in text
    assert "attention choice, with the options: auto+compile is ×" in text
    r = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert set(recorder.modes) == {"default"} and r["speed"]["compile_mode"] == "default"
    rows = {c["name"]: c for c in r["configs"]}
    assert list(rows) == ["diffusers", "sdpa", "auto", "diffusers+compile", "auto+compile"]
    assert rows["diffusers+compile"]["backend"] is None and rows["diffusers+compile"]["options"] == ["compile"]
    assert rows["auto+compile"]["baseline"] == "diffusers+compile" and rows["auto"]["baseline"] == "diffusers"
    for c in r["configs"]:
        assert c["speedup_vs_baseline"] > 0 and [p["batch"] for p in c["points"]] == [1, 2]
        if c["backend"]:  # counted exactly, compiled or not
            assert all(sum(p["served"].values()) == CALLS_PER_BATCH for p in c["points"])
    assert [(s["row"], s["against"]) for s in r["summary"]] == [
        ("auto", "diffusers"), ("auto+compile", "diffusers+compile"), ("diffusers+compile", "diffusers"),
        ("auto+compile", "diffusers")]
    torch._dynamo.reset()


def test_precision_settings_are_in_effect_and_in_the_recipe(cli, tmp_path):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        assert speed.set_precision("cuda:0", tf32=True, cudnn_benchmark=True) == {"tf32": True, "cudnn_benchmark": True}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
        speed.set_precision("cuda:0", tf32=False, cudnn_benchmark=False)
        assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved
    data = cli.json("generate", "a cat", "-m", "tiny", "--steps", "1", "--cudnn-benchmark", "--channels-last",
                    "-o", tmp_path)
    recipe = images.read_recipe(data["images"][0]["file"])
    # on the CPU neither TF32 nor cuDNN exists: the recipe says what was in effect
    assert recipe["speed"] == data["speed"] == {"compile": None, "compile_vae": None, "fuse_qkv": False,
                                                "channels_last": True, "tf32": False, "cudnn_benchmark": False}


def test_accuracy_is_judged_without_tf32_where_the_run_allows_it(cli, tmp_path, register_backend, monkeypatch):
    """The judge's fp32 reference and the kernel it judges run in full fp32 (TF32 has fp16's mantissa), while the
    run itself keeps the TF32 it was given: compare's kernel-level replay, and auto's tuner."""
    seen = []

    def spy(q, k, v, attn_mask=None, scale=None):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("tf32-spy", spy)
    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))  # auto measures anew, the spy among its candidates
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # what --tf32 sets on a GPU (on a CPU sdcli leaves it alone)
    try:
        cli.json("compare", "--seed", 1, "-m", "tiny", "--steps", 1, "--backends", "tf32-spy", "-o", tmp_path)
        assert set(seen) == {True, False}  # the image with TF32 allowed, the replayed calls without
        seen.clear()
        data = cli.json("generate", "a cat", "-m", "tiny", "--steps", 1, "-o", tmp_path)
        assert "tf32-spy" in {m["backend"] for e in data["tuning"]["shapes"] for m in e["measurements"]}
        assert seen[:2] == [False, False] and True in seen  # judged on two calls without TF32, then timed with it
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_compile_mode_needs_something_to_compile(cli, tmp_path):
    r = cli("generate", "a cat", "-m", "tiny", "--compile-mode", "reduce-overhead", "-o", tmp_path, code=2)
    assert "--compile-mode needs --compile or --compile-vae" in r.output
    r = cli("generate", "a cat", "-m", "tiny", "--compile", "--compile-mode", "fast", "-o", tmp_path, code=2)
    assert "--compile-mode must be one of default, reduce-overhead, max-autotune" in r.output


@pytest.mark.gpu
def test_gpu_reduce_overhead_keeps_cuda_graphs_with_routing_on(cli, tmp_path):
    """Real inductor on a GPU: the routed, counted UNet is captured in CUDA graphs (none skipped)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    data = cli.json("generate", "a cat", "-m", "tiny", "--steps", "4", "--num-images", "3", "--backend", "sdpa",
                    "--compile", "--compile-mode", "reduce-overhead", "--device", "cuda", "-o", tmp_path)
    assert data["speed"]["compile"] == "reduce-overhead" and "note" not in data["speed"]
    assert data["attention"]["served"] == {"sdpa": 3 * (14 * 4 + 1)}  # 3 batches of 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert "cudagraph_recorded_non_static_inputs" in counters["inductor"]  # a CUDA graph was recorded
    torch._dynamo.reset()
