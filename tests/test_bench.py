"""`sdcli bench`, measured `auto`, the architecture models and the speed options."""

import json

import pytest
import torch
from PIL import Image

from conftest import pixels, sdpa
from sdcli.benchmark import largest_batch

TINY_BENCH = ["--model", "tiny", "--steps", "2", "--repeats", "1"]
CALLS_PER_IMAGE = 14 * 2 + 1  # 14 UNet attention layers × 2 steps (CFG batched) + the VAE decoder's


def test_bench_end_to_end_on_cpu(cli, tmp_path):
    r = cli.json("bench", *TINY_BENCH, "--batch-sizes", "1,2", "--max-batch", "4", "-o", tmp_path)
    names = [c["name"] for c in r["configs"]]
    # in order of value: stock and auto first (a bench cut short still answers its first question), then the single
    # backends fastest first by the kernels' own times at the model's shapes
    assert names[:2] == ["diffusers", "auto"] and {"sdpa", "sdpa-flash"} <= set(names)
    total = {n: sum(next(m["ms"] for m in e["measurements"] if m["backend"] == n) for e in r["attention"])
             for n in names[2:]}
    assert names[2:] == sorted(names[2:], key=total.get)
    for c in r["configs"]:
        assert [p["batch"] for p in c["points"]] == [1, 2]
        assert all(p["images_per_s"] > 0 and p["s_per_image"] > 0 for p in c["points"])
        assert c["largest_batch"] == 4 and c["speedup_vs_diffusers"] > 0
        if c["backend"] not in (None, "auto"):
            assert all(p["served"] == {c["backend"]: CALLS_PER_IMAGE} for p in c["points"])
    auto = r["configs"][1]
    assert all(p["plan"]["path"].endswith(".json") for p in auto["points"])
    for e in r["attention"]:  # the micro-benchmark: every backend judged and timed, the fastest within bound chosen
        measured = {m["backend"]: m for m in e["measurements"]}
        assert {"sdpa", "sdpa-flash", "sdpa-math", "flex"} <= set(measured)
        assert all(m["ok"] and m["ms"] > 0 and m["calls_checked"] == 2 for m in measured.values())
        assert e["choice"] == min(measured.values(), key=lambda m: m["ms"])["backend"]
    assert {(e["shape"]["heads"], e["shape"]["head_dim"]) for e in r["attention"]} == {(2, 16), (2, 32), (1, 64)}
    assert Image.open(r["plot"]).size[0] > 500
    assert "compile time is in none of these numbers" in r["timing"]  # flex-compiled, flash-attn-4 compile untimed
    assert json.loads(open(r["json"]).read())["configs"][0]["name"] == "diffusers"


def test_largest_batch_search():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 11

    assert largest_batch(fits, 256) == (11, [(b, b <= 11) for b in tried])
    assert tried == [1, 2, 4, 8, 16, 12, 10, 11]
    assert largest_batch(lambda b: True, 100)[0] == 100
    assert largest_batch(lambda b: False, 100)[0] == 0


def test_out_of_memory_is_known_by_every_allocator():
    """The one test every command uses: CUDA's caching allocator, cuBLAS, cuDNN, a CUDA runtime call and the CPU
    allocator (messages as torch's ATen/cuda/Exceptions.h and c10's alloc_cpu.cpp write them); not a kernel's own
    limits, such as Triton's shared memory."""
    from sdcli import out_of_memory

    try:
        torch.empty(1 << 50, dtype=torch.uint8)  # the CPU allocator's own error, for real
    except RuntimeError as exc:
        cpu = exc
    for exc in (cpu, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError(),
                RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
                RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"),
                RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you "
                             "tried to allocate 1073741824 bytes.")):
        assert out_of_memory(exc), exc
    for exc in (RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448"),
                RuntimeError("CUDA error: an illegal memory access was encountered"), ValueError("head dim 512")):
        assert not out_of_memory(exc), exc


def test_bench_recovers_from_out_of_memory(cli, tmp_path, register_backend):
    """A kernel that runs out of memory above 3 images, as under a memory limit on the CPU (the allocator's own
    error: a RuntimeError, not torch.OutOfMemoryError): bench marks OOM, finds batch 3, and carries on."""
    def attention(q, k, v, attn_mask=None, scale=None):
        if q.shape[0] > 6:  # the UNet sees 2 × batch (CFG), the VAE 1 × batch
            torch.empty(1 << 50, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("oomy", attention)
    rows = {c["name"]: c for c in cli.json("bench", *TINY_BENCH, "--backends", "oomy", "--batch-sizes", "1,2,4,8",
                                           "--max-batch", "8", "--no-micro", "-o", tmp_path / "out")["configs"]}
    oomy = rows["oomy"]
    assert [(p["batch"], p["oom"]) for p in oomy["points"]] == [(1, False), (2, False), (4, True)]
    assert oomy["largest_batch"] == 3 and oomy["best"]["batch"] in (1, 2)  # which is faster is timing, not OOM
    assert rows["auto"]["largest_batch"] == 8  # the runs after the OOM are unharmed


def test_measured_auto_is_cached_reused_and_redone(cli, tmp_path, monkeypatch, register_backend):
    import time

    monkeypatch.setenv("SDCLI_CACHE_DIR", str(tmp_path / "cache"))

    def slow(q, k, v, attn_mask=None, scale=None):
        time.sleep(0.005)
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("slow", slow)
    register_backend("wrong", lambda q, k, v, attn_mask=None, scale=None: sdpa(q, k, v, scale=1.0))
    args = ["generate", "a cat", "--model", "tiny", "--steps", "2", "--seed", "1", "-o", tmp_path / "out"]
    first = cli.json(*args)
    plan = first["tuning"]
    assert plan["cached"] is False and (tmp_path / "cache" / "plans").is_dir()
    choices = {tuple(e["shape"][k] for k in ("heads", "head_dim", "q_len", "kv_len")): e for e in plan["shapes"]}
    assert len(choices) == 5
    for e in plan["shapes"]:
        measured = {m["backend"]: m for m in e["measurements"]}
        assert {"sdpa", "sdpa-flash", "slow", "wrong"} <= set(measured)
        assert measured["wrong"]["ok"] is False and measured["slow"]["ok"] is True
        assert e["choice"] not in ("slow", "wrong")
    for layer in first["attention"]["layers"]:  # what served each layer is the plan's choice for its shape
        for q_len, kv_len in layer["seqs"]:
            e = choices[(layer["heads"], layer["head_dim"], q_len, kv_len)]
            assert set(layer["calls"]) == {e["choice"]}
    second = cli.json(*args)
    assert second["tuning"]["cached"] is True and second["tuning"]["path"] == plan["path"]
    assert cli.json(*args, "--guidance", "9")["tuning"]["cached"] is True  # guidance still doubles the batch
    no_cfg = cli.json(*args, "--guidance", "1")["tuning"]  # diffusers runs no guidance: the UNet's batch halves
    assert no_cfg["cached"] is False and {e["shape"]["batch"] for e in no_cfg["shapes"]} == {1}
    for option in ("--fuse-qkv", "--channels-last"):
        assert cli.json(*args, option)["tuning"]["key"][option[2:].replace("-", "_")] is True
    again = cli.json(*args, "--retune")
    assert again["tuning"]["cached"] is False and again["tuning"]["created"] >= plan["created"]
    assert cli.json(*args, "--no-tune")["tuning"] is None
    doctor = cli.json("doctor")
    assert {p["key"]["model"] for p in doctor["plans"]} == {"tiny"}
    assert "Measured plan: tiny 128x128" in cli("doctor").stdout
    assert "Auto's plan: cached" in cli(*args, "--verbose").stdout


@pytest.mark.parametrize("name, expected", [
    ("sd15-arch", {(8, 40, 4096, 4096), (8, 40, 4096, 77), (8, 80, 1024, 1024), (8, 80, 1024, 77),
                   (8, 160, 256, 256), (8, 160, 256, 77), (8, 160, 64, 64), (8, 160, 64, 77), (1, 512, 4096, 4096)}),
    ("sdxl-arch", {(10, 64, 4096, 4096), (10, 64, 4096, 77), (20, 64, 1024, 1024), (20, 64, 1024, 77),
                   (1, 512, 16384, 16384)}),
])
def test_architecture_models_have_the_published_attention_shapes(name, expected):
    """Built on the meta device: no memory, no compute, only shapes flow through the routed model."""
    from sdcli import backends, hardware, models, routing

    pipe = models.architecture(name, "meta")
    router = routing.route(pipe, routing.Router([backends.get("sdpa")], hardware.Machine({}, "cpu"), True, "sdpa"))
    size = models.ARCHITECTURES[name]["size"] // 8
    extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280, device="meta"),
                                   "time_ids": torch.zeros(2, 6, device="meta")}} if name == "sdxl-arch" else {}
    with torch.no_grad():
        pipe.unet(torch.zeros(2, 4, size, size, device="meta"), 10,
                  torch.zeros(2, 77, pipe.unet.config.cross_attention_dim, device="meta"), **extra)
        pipe.vae.decode(torch.zeros(1, 4, size, size, device="meta"))
    assert {(s.heads, s.head_dim, s.q_len, s.kv_len) for s in routing.seen_shapes(router)} == expected
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    assert round(params) == {"sd15-arch": 860, "sdxl-arch": 2567}[name]


@pytest.mark.parametrize("name, expected, layers, billions", [
    # 1024²: 4096 image tokens; SD 3 adds 77 CLIP + 256 T5 text tokens, Flux 512 T5 tokens. Medium's first 13
    # blocks have a second attention over the image tokens alone. VAE mid-block: 1 × 512 at 128² latents.
    ("sd35-medium-arch", {(24, 64, 4429, 4429), (24, 64, 4096, 4096), (1, 512, 16384, 16384)}, 24 + 13, 2.24),
    ("sd35-large-arch", {(38, 64, 4429, 4429), (1, 512, 16384, 16384)}, 38, 8.06),
    ("flux-dev-arch", {(24, 128, 4608, 4608), (1, 512, 16384, 16384)}, 19 + 38, 11.9),
])
def test_transformer_architectures_have_the_published_attention_shapes(name, expected, layers, billions):
    """As above, for the MMDiT and Flux transformers: one denoising call with CFG's batch of 2 (SD 3) or 1."""
    from sdcli import backends, hardware, models, routing

    pipe = models.architecture(name, "meta")
    router = routing.route(pipe, routing.Router([backends.get("sdpa")], hardware.Machine({}, "cpu"), True, "sdpa"))
    latent = models.ARCHITECTURES[name]["size"] // 8
    meta = lambda *shape: torch.zeros(*shape, device="meta")  # noqa: E731
    with torch.no_grad():
        if name == "flux-dev-arch":  # latents packed 2×2 into 64 channels
            tokens = (latent // 2) ** 2
            pipe.transformer(meta(1, tokens, 64), encoder_hidden_states=meta(1, 512, 4096),
                             pooled_projections=meta(1, 768), timestep=meta(1), img_ids=meta(tokens, 3),
                             txt_ids=meta(512, 3), guidance=meta(1))
        else:
            pipe.transformer(meta(2, 16, latent, latent), encoder_hidden_states=meta(2, 333, 4096),
                             pooled_projections=meta(2, 2048), timestep=meta(2))
        pipe.vae.decode(meta(1, 16, latent, latent))
    assert {(s.heads, s.head_dim, s.q_len, s.kv_len) for s in routing.seen_shapes(router)} == expected
    transformer = [l for l in router.layers if l.name.startswith("transformer.")]
    assert len(transformer) == layers and all(l.calls for l in transformer)  # every one called, and counted
    assert round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, 2 if billions < 10 else 1) == billions


def test_speed_options_keep_routing_and_the_image(cli, tmp_path):
    base = cli.json("generate", "a cat", "--model", "tiny", "--steps", "2", "--seed", "3", "--backend", "sdpa",
                    "-o", tmp_path / "a")
    fast = cli.json("generate", "a cat", "--model", "tiny", "--steps", "2", "--seed", "3", "--backend", "sdpa",
                    "--fuse-qkv", "--channels-last", "-o", tmp_path / "b")
    assert fast["attention"]["served"] == base["attention"]["served"] == {"sdpa": CALLS_PER_IMAGE}
    a, b = pixels(base["images"][0]["file"]), pixels(fast["images"][0]["file"])
    assert abs(a.astype(int) - b.astype(int)).max() <= 2  # fused matmuls round a little differently


def test_compile_counts_every_call_without_recompiling(cli, tmp_path):
    import torch._dynamo

    # a recompile per call (dynamo guarding on a Python counter) would raise here instead of silently crawling
    with torch._dynamo.config.patch(error_on_recompile=True):
        data = cli.json("generate", "a cat", "--model", "tiny", "--steps", "2", "--seed", "1", "--backend", "sdpa",
                        "--num-images", "3", "--compile", "-o", tmp_path)
    assert data["attention"]["served"] == {"sdpa": 3 * CALLS_PER_IMAGE}
    torch._dynamo.reset()


def test_interrupted_bench_keeps_the_rows_it_measured(cli, tmp_path, register_backend):
    """Ctrl-C (or a time limit's SIGINT) in the middle of a configuration: the rows before it are saved, JSON and
    plot, and the exit status is 130. Here the interrupt comes from a kernel, at batch 2 of its row. Stock diffusers
    and auto come first, so the speed-up auto buys is there."""
    def attention(q, k, v, attn_mask=None, scale=None):
        if q.shape[0] > 2:  # batch 2 with CFG
            raise KeyboardInterrupt
        return sdpa(q, k, v, attn_mask, scale)

    register_backend("ctrl-c", attention, in_auto=False)
    result = cli("bench", *TINY_BENCH, "--backends", "sdpa,ctrl-c", "--batch-sizes", "1,2", "--no-find-max",
                 "--no-micro", "--json", "-o", tmp_path / "out", code=130)
    data = json.loads(result.stdout)
    assert [c["name"] for c in data["configs"]] == ["diffusers", "auto", "sdpa"]
    assert data["interrupted"] == {"rows_done": 3, "rows_planned": 4}
    assert data["summary"][0]["what"] == "attention choice" and data["summary"][0]["speedup"] > 0
    assert json.loads(open(data["json"]).read())["configs"] == data["configs"] and Image.open(data["plot"])
    assert f"interrupted: 3 of 4 configurations measured, kept in {data['json']}" in result.stderr
    assert "Traceback" not in result.stderr
