"""Speed options at full strength: compiled runs count exactly like eager ones, compile at most once per batch
size, hand dynamo graphs that write to none of their inputs (so CUDA graphs stay possible), bench keeps the
attention gain and the options' gain apart, and TF32 never reaches the accuracy judge. (Host time per call is
measured by scripts/attention_overhead.py, not by a timed test.)"""

import json

import pytest
import torch

from conftest import Cli, sdpa
from sdcli import images, speed

CALLS_PER_BATCH = 14 * 2 + 1  # 14 UNet attention layers × 2 steps (whole batch and CFG in one call) + the VAE's
BATCH_SIZES = (1, 2, 3)  # 1, then 2 (dynamo's automatic dynamic shapes would start here), then a third size
GENERATE = ("generate", "a cat", "-m", "tiny", "--steps", 2, "--seed", 1, "--backend", "sdpa")
UNET, VAE = "time_embedding", "post_quant_conv"  # a module only that part has: names its dynamo graphs


class Recorder:
    """A torch.compile backend that keeps every graph dynamo hands over and runs it as it is, counting its runs:
    dynamo's tracing, guards and recompiles are real, without inductor's minutes of C++ compiling on a 2-core CPU."""

    def __init__(self):
        self.graphs, self.runs, self.modes = [], [], []

    def __call__(self, gm, example_inputs, **kwargs):
        index = len(self.graphs)
        self.graphs.append(gm)
        self.runs.append(0)

        def run(*args):
            self.runs[index] += 1
            return gm.forward(*args)

        return run

    def of(self, part: str) -> list[int]:
        """The graphs (indices) of one part of the pipeline."""
        return [i for i, gm in enumerate(self.graphs) if any(part in n.name for n in gm.graph.nodes)]


def recording(monkeypatch) -> Recorder:
    import torch._dynamo

    recorder, real = Recorder(), torch.compile

    def compile(fn=None, mode=None, **kwargs):
        recorder.modes.append(mode)
        return real(fn, backend=recorder, **kwargs)

    monkeypatch.setattr(torch, "compile", compile)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return recorder


def mutated_inputs(gm) -> list[str]:
    """Graph inputs that an in-place op (add_, copy_, ...) writes to, directly or through an index of them: what
    makes inductor skip CUDA graphs."""
    import operator

    name = lambda n: n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")  # noqa: E731
    base = {n: n for n in gm.graph.nodes if n.op == "placeholder"}
    for n in gm.graph.nodes:  # views of an input (x[i], x.select(...)) write to it
        if n.args and n.args[0] in base and (n.target is operator.getitem or name(n) in ("select", "view")):
            base[n] = base[n.args[0]]
    return sorted({base[n.args[0]].name for n in gm.graph.nodes if n.op in ("call_method", "call_function")
                   and n.args and n.args[0] in base and name(n).endswith("_") and not name(n).startswith("_")})


def per_layer(data: dict) -> dict:
    return {layer["layer"]: layer["calls"] for layer in data["attention"]["layers"]}


@pytest.fixture(scope="module")
def batch_sizes(tmp_path_factory):
    """`generate --compile --compile-vae` at batch sizes 1..3 in one process, two batches of 2 steps at each size
    (the first forward at a size runs eagerly, the rest compiled), dynamo's graphs after each size; and the same
    runs uncompiled."""
    from torch._dynamo.utils import counters

    cli, tmp = Cli(), tmp_path_factory.mktemp("speed")
    compiled, graphs = {}, []
    with pytest.MonkeyPatch.context() as monkeypatch:
        recorder = recording(monkeypatch)
        for b in BATCH_SIZES:
            compiled[b] = cli.json(*GENERATE, "--batch-size", b, "--num-images", 2 * b, "--compile", "--compile-vae",
                                   "-o", tmp / f"compiled-{b}")
            graphs.append((len(recorder.of(UNET)), len(recorder.of(VAE))))
        graph_breaks = dict(counters["graph_break"])
    torch._dynamo.reset()
    eager = {b: cli.json(*GENERATE, "--batch-size", b, "--num-images", 2 * b, "-o", tmp / f"eager-{b}")
             for b in BATCH_SIZES}
    return compiled, eager, recorder, graphs, graph_breaks


def test_generate_compiled_counts_like_eager_and_compiles_at_most_once_per_batch_size(batch_sizes):
    compiled, eager, recorder, graphs, graph_breaks = batch_sizes
    for b in BATCH_SIZES:
        assert per_layer(compiled[b]) == per_layer(eager[b])
        assert compiled[b]["attention"]["served"] == {"sdpa": 2 * CALLS_PER_BATCH}
        assert compiled[b]["speed"]["compile"] == compiled[b]["speed"]["compile_vae"] == "default"
    assert graph_breaks == {}  # routing traced whole: its first-call path never is
    new = [(u - pu, v - pv) for (u, v), (pu, pv) in zip(graphs, [(0, 0)] + graphs)]
    assert all(0 <= u <= 1 and 0 <= v <= 1 for u, v in new) and new[0] == (1, 1)  # ≤ one graph per size and part
    assert len(recorder.graphs) == graphs[-1][0] + graphs[-1][1]
    # and the graphs did the work: at each size one eager forward (the first), the other 3 UNet steps and the
    # second batch's decode compiled
    assert sum(recorder.runs[i] for i in recorder.of(UNET)) == 3 * len(BATCH_SIZES)
    assert sum(recorder.runs[i] for i in recorder.of(VAE)) == len(BATCH_SIZES)
    assert set(recorder.modes) == {"default"}


def test_compiled_graphs_write_to_none_of_their_inputs(batch_sizes):
    """Inductor skips CUDA graphs for a graph that writes to its (non-static) inputs: sdcli's counting must not."""
    recorder = batch_sizes[2]
    assert recorder.graphs and [mutated_inputs(g) for g in recorder.graphs] == [[]] * len(recorder.graphs)


def test_api_compiles_like_generate_and_a_callers_own_compile_still_counts_exactly(monkeypatch):
    import sdcli
    from sdcli.models import tiny

    recorder = recording(monkeypatch)
    pipe = tiny()
    plan = sdcli.route(pipe, backend="sdpa")
    assert sdcli.compile(pipe, mode="reduce-overhead") == "default"  # no CUDA graphs on a CPU
    for _ in range(3):
        pipe("a cat", num_inference_steps=2)
    assert plan.served()["backends"] == {"sdpa": 3 * CALLS_PER_BATCH}
    (graph,) = recorder.of(UNET)
    assert recorder.runs[graph] == 3 * 2 - 1 and mutated_inputs(recorder.graphs[graph]) == []

    # torch.compile by the caller, after one eager call: the calls inside the graph go to the router's counter
    # tensor, so the counts stay exact and nothing recompiles per call; that tensor is the one input it writes to
    pipe = tiny()
    plan = sdcli.route(pipe, backend="sdpa")
    pipe("a cat", num_inference_steps=2)
    pipe.unet = torch.compile(pipe.unet)
    for _ in range(3):
        pipe("a cat", num_inference_steps=2)
    assert plan.served()["backends"] == {"sdpa": 4 * CALLS_PER_BATCH}
    graph = recorder.of(UNET)[-1]
    assert len(recorder.of(UNET)) == 2 and recorder.runs[graph] == 3 * 2
    assert len(mutated_inputs(recorder.graphs[graph])) == 1
    torch._dynamo.reset()


def test_bench_separates_the_gains_and_says_cpu_has_no_cuda_graphs(cli, tmp_path, monkeypatch):
    recorder = recording(monkeypatch)
    text = cli("bench", "-m", "tiny", "--compile", "--compile-mode", "reduce-overhead", "--batch-sizes", "1",
               "--steps", "2", "--repeats", "1", "--backends", "sdpa", "--no-micro", "--no-find-max",
               "-o", tmp_path).stdout
    assert "CUDA graphs, which need a CUDA GPU: compiled in default mode" in text
    assert "attention choice, with the options: auto+compile is ×" in text
    r = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert set(recorder.modes) == {"default"} and r["speed"]["compile_mode"] == "default"
    rows = {c["name"]: c for c in r["configs"]}
    assert list(rows) == ["diffusers", "auto", "sdpa", "diffusers+compile", "auto+compile"]
    assert rows["diffusers+compile"]["backend"] is None and rows["diffusers+compile"]["options"] == ["compile"]
    assert rows["auto+compile"]["baseline"] == "diffusers+compile" and rows["auto"]["baseline"] == "diffusers"
    for c in r["configs"]:
        assert c["speedup_vs_baseline"] > 0 and [p["batch"] for p in c["points"]] == [1]
        if c["backend"]:  # counted exactly, compiled or not
            assert all(sum(p["served"].values()) == CALLS_PER_BATCH for p in c["points"])
    assert [(s["row"], s["against"]) for s in r["summary"]] == [
        ("auto", "diffusers"), ("auto+compile", "diffusers+compile"), ("diffusers+compile", "diffusers"),
        ("auto+compile", "diffusers")]
    # the compiled rows' timed renders ran the graphs: the UNet's 2 steps per timed render, in both compiled rows
    assert sum(recorder.runs[i] for i in recorder.of(UNET)) >= 2 * 2
    torch._dynamo.reset()


def test_precision_settings_are_in_effect_and_in_the_recipe(cli, tmp_path):
    flags = ("allow_tf32", "allow_tf32", "benchmark")
    where = (torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cudnn)
    saved = [getattr(w, f) for w, f in zip(where, flags)]
    try:
        assert speed.set_precision("cuda:0", tf32=True, cudnn_benchmark=True) == {"tf32": True, "cudnn_benchmark": True}
        assert all(getattr(w, f) for w, f in zip(where, flags))
        speed.set_precision("cuda:0", tf32=False, cudnn_benchmark=False)
        assert not any(getattr(w, f) for w, f in zip(where, flags))
    finally:
        for w, f, value in zip(where, flags, saved):
            setattr(w, f, value)
    data = cli.json("generate", "a cat", "-m", "tiny", "--steps", "1", "--cudnn-benchmark", "--channels-last",
                    "-o", tmp_path)
    recipe = images.read_recipe(data["images"][0]["file"])
    # on the CPU neither TF32 nor cuDNN exists: the recipe says what was in effect
    assert recipe["speed"] == data["speed"] == {"compile": None, "compile_vae": None, "fuse_qkv": False,
                                                "channels_last": True, "tf32": False, "cudnn_benchmark": False}
    assert recipe["settings"]["cudnn_benchmark"] is True and recipe["settings"]["tf32"] is True  # as given


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
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0  # CUDA graphs were recorded
    torch._dynamo.reset()
