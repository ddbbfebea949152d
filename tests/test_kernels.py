"""The kernels a user can install today: FlashAttention-4 (its own function, and through SDPA), SageAttention 1,
compiled flex_attention; and xFormers' fix on a CUDA 13 torch. Verdicts come from saved reports of real GPU types;
the kernels themselves need a GPU (tests marked gpu)."""

import json
import textwrap

import pytest

from conftest import REPORTS, ROOT, run_sdcli, sdpa

NEW = {"flash-attn-4": "exact", "sdpa-fa4": "exact", "flex-compiled": "exact", "sage1": "quantized"}


def verdicts(cli, report):
    data = cli.json("doctor", "--report", report)
    return {row["backend"]: row for row in data["verdicts"]["backends"]}


def derived_report(tmp_path, base, name, cc, torch=None):
    """A saved report with another GPU put in: the same packages on another generation (and another torch)."""
    data = json.loads((REPORTS / f"{base}.json").read_text())
    data["gpus"][0].update(name=name, compute_capability=cc)
    if torch:
        data["torch"]["version"] = data["packages"]["torch"]["version"] = torch
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def test_cpu_doctor_says_why_each_new_backend_cannot_run(cli):
    rows = {r["backend"]: r for r in cli.json("doctor")["verdicts"]["backends"]}
    for name, kind in NEW.items():
        assert rows[name]["kind"] == kind and rows[name]["reason"] and rows[name]["fix"], rows[name]
    flex = rows["flex-compiled"]
    assert flex["status"] == "needs a GPU" and flex["reason"].startswith("needs an NVIDIA GPU")
    for name, pip in (("flash-attn-4", "pip install 'flash-attn-4>=4.0.0b36'"),
                      ("sdpa-fa4", "pip install 'flash-attn-4>=4.0.0b36'"),
                      ("sage1", "pip install 'sageattention>=1.0.6'")):
        assert rows[name]["status"] == "not installed", rows[name]
        assert rows[name]["fix"].startswith(pip), rows[name]


def test_the_gpu_machine_with_what_pypi_serves(cli, tmp_path):
    """H100, torch 2.11 + CUDA 13, the wheels PyPI has: what each new backend serves, and xformers' remedy."""
    v = verdicts(cli, REPORTS / "h100-cu13.json")
    for name in ("flash-attn-4", "flex-compiled", "sage1"):
        assert v[name]["status"] == "usable", v[name]
    assert v["flash-attn-4"]["serves"]["SD 1.x 512²"]["ok"] == 5  # 40/80/160-wide heads: 8-256 on SM90
    assert v["flash-attn-4"]["serves"]["VAE 512²"]["refused"] == ["head dim 512 > 256"]
    # torch's FA4 bridge unpacks two results from flash-attn-4's forward, which returns five: refused, not tried
    fa4 = v["sdpa-fa4"]
    assert fa4["status"] == "wrong version" and fa4["fix"] == "--backend flash-attn-4 runs the same kernels directly"
    assert fa4["reason"].startswith("torch 2.11.0+cu130's FA4 bridge takes 2 results from flash-attn-4's forward")
    future = verdicts(cli, derived_report(tmp_path, "h100-cu13", "NVIDIA H100 80GB HBM3", "9.0", torch="2.14.0"))
    assert future["sdpa-fa4"]["status"] == "usable"  # a newer torch is left to the probe
    assert future["sdpa-fa4"]["serves"]["SD 1.x 512²"]["ok"] == 5
    assert future["sdpa-fa4"]["serves"]["VAE 512²"]["refused"] == ["head dim 512 > 256"]
    sage1 = v["sage1"]["serves"]
    assert sage1["SD 1.x 512²"]["ok"] == 0 and "head dim 40 not in 64/96/128" in sage1["SD 1.x 512²"]["refused"]
    assert sage1["SDXL 1024²"]["ok"] == 2 and sage1["SDXL 1024²"]["refused"][0].startswith("77 keys, not a multiple of 64")
    flex = v["flex-compiled"]["serves"]  # not the VAE's 512-wide head: more shared memory than an H100 has
    assert flex["SD 1.x 512²"]["ok"] == 5 and flex["VAE 512²"]["ok"] == 0
    assert flex["VAE 512²"]["refused"][0].startswith("head dim 512 > 256: compiled flex_attention's kernel needs")
    machine = __import__("sdcli").hardware.Machine(json.loads((REPORTS / "h100-cu13.json").read_text()))
    narrow = __import__("sdcli").backends.get("flex-compiled").verdict(machine, __import__("sdcli").backends.Shape(8, 8, 64, 64))
    assert narrow.reason == "head dim 8 < 16: compiled flex_attention fails below 16 on CUDA"
    xf = v["xformers"]
    assert xf["status"] == "broken install" and "libcudart.so.12" in xf["reason"] and "2.10.0+cu128" in xf["reason"]
    assert "pip install nvidia-cuda-runtime-cu12" in xf["fix"] and "LD_LIBRARY_PATH" in xf["fix"]
    assert "unverified" in xf["fix"]
    assert v["sage"]["status"] == "wrong version" and "--backend sage1" in v["sage"]["fix"]
    assert v["flash-attn"]["status"] == "not installed"


@pytest.mark.parametrize("gpu, cc, fa4_sd1, sdpa_fa4", [
    ("NVIDIA A100-SXM4-80GB", "8.0", 5, "runs only on SM9x/SM10x"),
    ("NVIDIA B200", "10.0", 3, "usable"),             # SM100: 8-128 or 256, so the 160-wide heads are refused
    ("NVIDIA GeForce RTX 5090", "12.0", 5, "runs only on SM9x/SM10x"),
    ("Tesla T4", "7.5", None, "runs only on SM9x/SM10x"),
])
def test_flash_attention_4_by_gpu_generation(cli, tmp_path, gpu, cc, fa4_sd1, sdpa_fa4):
    v = verdicts(cli, derived_report(tmp_path, "h100-cu13", gpu, cc, torch="2.14.0"))  # a torch whose bridge fits
    fa4 = v["flash-attn-4"]
    if fa4_sd1 is None:
        assert fa4["status"] == "unsupported on this GPU" and "needs SM80+" in fa4["reason"]
    else:
        assert fa4["status"] == "usable" and fa4["serves"]["SD 1.x 512²"]["ok"] == fa4_sd1
        if fa4_sd1 < 5:
            assert fa4["serves"]["SD 1.x 512²"]["refused"] == ["head dim 160: FlashAttention-4 on SM10x takes 8-128 or 256"]
    if sdpa_fa4 == "usable":
        assert v["sdpa-fa4"]["status"] == "usable"
    else:
        assert v["sdpa-fa4"]["status"] == "unsupported on this GPU" and sdpa_fa4 in v["sdpa-fa4"]["reason"]


@pytest.mark.parametrize("torch_v, does", [
    ("2.13.0", None),  # the bridge takes two results where flash-attn-4 returns five: every call raises
    ("2.14.1", "runs torch's own FlashAttention-2 instead (FA4 would not run)"),
    ("2.15.0", "raises"),
])
def test_sdpa_fa4_follows_the_torch_version(tmp_path, torch_v, does):
    """torch 2.14 and later take flash-attn-4's results; what FA4 can't take (fp32, a GPU other than SM 9.x/10.x)
    2.14's bridge silently hands to FlashAttention-2 and 2.15's raises on: refused either way, saying which."""
    from sdcli import backends, hardware

    fa4 = backends.get("sdpa-fa4")

    def verdict(gpu, cc, dtype):
        path = derived_report(tmp_path, "h100-cu13", gpu, cc, torch=torch_v)
        return fa4.verdict(hardware.Machine(json.loads(path.read_text())), backends.Shape(8, 64, 1024, 1024, dtype))

    h100_fp16, h100_fp32 = verdict("NVIDIA H100 80GB HBM3", "9.0", "fp16"), verdict("NVIDIA H100 80GB HBM3", "9.0", "fp32")
    a100 = verdict("NVIDIA A100-SXM4-80GB", "8.0", "fp16")
    if does is None:
        assert {h100_fp16.status, h100_fp32.status, a100.status} == {"wrong version"}
        return
    assert h100_fp16.usable and verdict("NVIDIA B200", "10.0", "bf16").usable
    assert h100_fp32.status == "unsupported shape" and h100_fp32.reason == f"takes fp16/bf16 only: in fp32 torch {torch_v}'s FA4 bridge {does}"
    assert a100.status == "unsupported on this GPU"
    assert a100.reason == f"runs only on SM9x/SM10x: on NVIDIA A100-SXM4-80GB (SM80) torch {torch_v}'s FA4 bridge {does}"


def test_older_machines_name_the_version_that_is_missing(cli):
    h100 = verdicts(cli, REPORTS / "h100.json")  # torch 2.7.1, SageAttention 2.2 built from source
    assert h100["sdpa-fa4"]["status"] == "wrong version" and "torch 2.7.1+cu128 can't swap FA4" in h100["sdpa-fa4"]["reason"]
    assert h100["flash-attn-4"]["status"] == "usable"
    assert h100["sage1"]["status"] == "wrong version" and h100["sage1"]["fix"] == "SageAttention 2 serves --backend sage"
    t4 = verdicts(cli, REPORTS / "t4.json")  # SageAttention 1.0.6 has no GPU check of its own: Triton on SM75
    assert t4["sage1"]["status"] == "usable" and t4["sage"]["status"] == "wrong version"
    assert t4["flash-attn-4"]["status"] == "unsupported on this GPU"


def test_auto_measures_exact_ones_and_quantized_only_when_asked():
    from sdcli import backends, hardware

    machine = hardware.Machine(json.loads((REPORTS / "h100-cu13.json").read_text()))

    def candidates(shape, quantized):  # what measured auto times at a shape
        return {b.name for b in backends.usable_here(machine, shape, quantized, in_auto_only=True)}

    shape = backends.Shape(10, 64, 4096, 4096, "bf16")
    exact = candidates(shape, quantized=False)
    assert "flash-attn-4" in exact and not {"sage1", "sdpa-fa4"} & exact  # sdpa-fa4: its bridge
    assert "flex-compiled" not in exact  # a compile per shape: tried only when named
    assert "sage1" in candidates(shape, quantized=True)
    assert "sage1" not in candidates(backends.Shape(10, 64, 4096, 77, "bf16"), quantized=True)


def fake_package(folder, dist, version, files, requires=()):
    """An installed-looking distribution in `folder` (put it on PYTHONPATH): its files and a dist-info."""
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    lines = "".join(f"Requires-Dist: {r}\n" for r in requires)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n{lines}")


def test_broken_installs_are_verdicts_with_their_error(tmp_path):
    """flash-attn-4 and sageattention that fail to import, and an xformers whose compiled ops can't find the CUDA 12
    runtime (as on a CUDA 13 torch), each as the verdict doctor gives, with the error behind it."""
    fake_package(tmp_path, "flash-attn-4", "4.0.0b36", {"flash_attn/cute/__init__.py": "import cutlass_not_here\n"})
    fake_package(tmp_path, "sageattention", "1.0.6", {"sageattention/__init__.py": "import triton_not_here\n"})
    fake_package(tmp_path, "xformers", "0.0.35", {
        "xformers/__init__.py": "from . import _cpp_lib\n_has_cpp_library = _cpp_lib._cpp_library_load_exception is None\n",
        "xformers/_cpp_lib.py": """
            try:
                try:
                    raise OSError("libcudart.so.12: cannot open shared object file: No such file or directory")
                except OSError as exc:
                    raise RuntimeError("xFormers can't load C++/CUDA extensions") from exc
            except RuntimeError as exc:
                _cpp_library_load_exception = exc
        """,
        "xformers/cpp_lib.json": '{"version": {"cuda": 1208, "torch": "2.10.0+cu128"}}',
    }, requires=["torch>=2.10"])
    result = run_sdcli("doctor", "--json", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    rows = {r["backend"]: r for r in data["verdicts"]["backends"]}
    for name in ("flash-attn-4", "sdpa-fa4"):
        assert rows[name]["status"] == "broken install" and "No module named 'cutlass_not_here'" in rows[name]["reason"]
    assert rows["sage1"]["status"] == "broken install" and "triton_not_here" in rows["sage1"]["reason"]
    assert rows["flash-attn"]["status"] == "not installed"  # flash-attn-4's bare flash_attn/ folder is not FA2
    xf = data["report"]["packages"]["xformers"]
    assert xf["ops_ok"] is False and xf["built_for_torch"] == "2.10.0+cu128" and xf["built_for_cuda"] == "12.8"
    assert rows["xformers"]["status"] == "broken install" and "nvidia-cuda-runtime-cu12" in rows["xformers"]["fix"]


# flash-attn-4 4.0.0b36 as its wheel lays it out: flash_attn/ without __init__.py, a version looked up under the
# wrong distribution name, and a disk cache read from the environment once, at import
FA4_FILES = {
    "flash_attn/cute/__init__.py": """
        from importlib.metadata import PackageNotFoundError, version
        try:
            __version__ = version("fa4")
        except PackageNotFoundError:
            __version__ = "0.0.0"
        from . import cache_utils
    """,
    "flash_attn/cute/cache_utils.py": """
        import os
        CUTE_DSL_CACHE_ENABLED = os.getenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0") == "1"
    """,
}
# xformers 0.0.35: xformers/ops/fmha/flash.py imports flash-attn 2's interface whenever a `flash_attn` is findable
XFORMERS_FILES = {
    "xformers/__init__.py": "_has_cpp_library = True\n",
    "xformers/ops/__init__.py": """
        import importlib.util
        if importlib.util.find_spec("flash_attn"):
            import flash_attn
            import flash_attn.flash_attn_interface
    """,
    "xformers/cpp_lib.json": '{"version": {"cuda": 1208, "torch": "2.10.0+cu128"}}',
}


def test_doctor_with_flash_attn_4_and_xformers_names_the_real_reason(tmp_path):
    """Both installed, as on a GPU machine with everything from PyPI: `import xformers.ops` fails on flash-attn-4's
    bare flash_attn/ folder, diffusers turns xformers off and calls it too old. doctor names the import error and
    its cause instead of "pip install -U xformers". FlashAttention-4's disk cache is on (it recompiles in every
    process otherwise), and its version comes from its distribution, not from the module's "0.0.0"."""
    fake_package(tmp_path, "flash-attn-4", "4.0.0b36", FA4_FILES)
    fake_package(tmp_path, "xformers", "0.0.35", XFORMERS_FILES, requires=["torch>=2.10"])
    result = run_sdcli("doctor", "--json", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    xf = {r["backend"]: r for r in data["verdicts"]["backends"]}["xformers"]
    assert xf["status"] == "broken install", xf
    assert "import xformers.ops fails: ModuleNotFoundError: No module named 'flash_attn.flash_attn_interface'" in xf["reason"]
    assert "flash-attn-4's flash_attn/ folder" in xf["reason"] and "environment of its own" in xf["fix"]
    assert "too old" not in xf["reason"] and "-U" not in xf["fix"]
    assert "too old" in data["report"]["diffusers_backends"]["xformers"]  # what diffusers itself says
    fa4 = data["report"]["packages"]["flash_attn_4"]
    assert fa4["version"] == "4.0.0b36" and fa4["disk_cache"] is True
    off = run_sdcli("doctor", "--json", env={"PYTHONPATH": str(tmp_path), "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "0"})
    assert json.loads(off.stdout)["report"]["packages"]["flash_attn_4"]["disk_cache"] is False  # the user's choice


def test_flash_attn_4_version_is_never_its_modules_placeholder(tmp_path, monkeypatch):
    """flash_attn.cute.__version__ always reads "0.0.0": without the distribution's metadata the version is unknown,
    not a "0.0.0" that the version check would call too old."""
    import sys

    from sdcli import backends, hardware

    for rel, text in FA4_FILES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        info = hardware.package_info(["flash-attn-4"], "flash_attn.cute")
    finally:
        for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.")]:
            del sys.modules[name]
    assert info["import_ok"] is True and info["version"] is None
    machine = hardware.Machine({"packages": {"flash_attn_4": info}})
    assert backends.get("flash-attn-4").package.check(machine, None) is None


def test_gpus_are_matched_by_uuid_not_by_index(monkeypatch):
    """NVML counts every GPU in bus order; CUDA only the visible ones, fastest first. With an A100 and an H100 and
    CUDA_VISIBLE_DEVICES=1, cuda:0 is the H100: the report's GPU 0 must be it, with NVML's facts, not NVML's GPU 0.
    NVML and the CUDA device are faked: the GPU boundary."""
    import sys
    import types

    import torch

    from sdcli import hardware

    nvml = [("NVIDIA A100-SXM4-80GB", (8, 0), "GPU-aaaaaaaa-0000-0000-0000-000000000001"),
            ("NVIDIA H100 80GB HBM3", (9, 0), "GPU-bbbbbbbb-0000-0000-0000-000000000002")]
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlSystemGetDriverVersion = lambda: "580.65.06"
    fake.nvmlSystemGetCudaDriverVersion_v2 = lambda: 13000
    fake.nvmlDeviceGetCount = lambda: len(nvml)
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda h: nvml[h][0]
    fake.nvmlDeviceGetCudaComputeCapability = lambda h: nvml[h][1]
    fake.nvmlDeviceGetUUID = lambda h: nvml[h][2]
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30, free=(70 + h) * 2**30)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    h100 = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30,
                                 multi_processor_count=132, uuid="bbbbbbbb-0000-0000-0000-000000000002")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: h100)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (71 * 2**30, 80 * 2**30))
    report = hardware.probe(measure=False)
    [gpu] = report["gpus"]
    assert (gpu["index"], gpu["nvml_index"], gpu["name"], gpu["compute_capability"]) == (0, 1, "NVIDIA H100 80GB HBM3", "9.0")
    assert gpu["multiprocessors"] == 132 and gpu["memory_free_gb"] == 71
    assert hardware.Machine(report, "cuda:0").gpu_label == "NVIDIA H100 80GB HBM3 (SM90)"


def test_extras_admit_the_versions_sdcli_was_written_for():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    flash4, = map(Requirement, extras["flash4"])
    sage1, = map(Requirement, extras["sage1"])
    assert flash4.name == "flash-attn-4" and flash4.specifier.contains("4.0.0b36")  # a pre-release, named: pip takes it
    assert sage1.name == "sageattention" and sage1.specifier.contains("1.0.6") and not sage1.specifier.contains("2.1.1")


def test_sdpa_fa4_activates_fa4_for_the_call_and_restores(monkeypatch):
    """On the CPU SDPA runs its CPU kernel, but the switch itself is torch's and can be watched: FA4 is in the
    dispatcher for SDPA's CUDA flash op during the call only."""
    import sys
    import types

    import torch
    from torch.nn import attention

    from sdcli import backends

    try:
        import flash_attn.cute.interface  # noqa: F401  (installed: torch's bridge imports the real one)
    except ImportError:  # what the bridge imports: FA4's two entry points
        fake = types.ModuleType("flash_attn.cute.interface")
        fake._flash_attn_fwd = fake._flash_attn_bwd = lambda *a, **k: None
        monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", fake)

    def cuda_flash_kernels():
        table = torch._C._dispatch_dump("aten::_scaled_dot_product_flash_attention")
        return [line for line in table.splitlines() if line.startswith("CUDA")]

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((attention.current_flash_attention_impl(), len(cuda_flash_kernels())))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = (torch.randn(1, 64, 2, 40) for _ in range(3))
    before = cuda_flash_kernels()
    out = backends.get("sdpa-fa4").run(q, k, v)
    assert seen == [("FA4", len(before) + 1)]
    assert attention.current_flash_attention_impl() is None and cuda_flash_kernels() == before
    assert torch.allclose(out, sdpa(q, k, v), atol=1e-6)


def test_flex_compiled_compiles_each_shape_once_whatever_the_batch_and_exactly():
    """Every shape gets its own compiled function, and one compile serves every batch size (auto and bench judge at
    batch 1 and time at the run's batch): with one compile allowed per function (and a hard error past it), two
    shapes at batch 1, 2 and 3 compile twice in all, and their results are exact."""
    import torch
    from torch._dynamo.utils import counters

    from sdcli import backends, kernels

    flex = backends.get("flex-compiled")
    before = len(kernels._compiled_flex)
    frames = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for batch, n in ((1, 32), (2, 32), (1, 48), (3, 32), (2, 48)):
            q, k, v = (torch.randn(batch, n, 2, 16) for _ in range(3))
            assert torch.allclose(flex.run(q, k, v), sdpa(q, k, v), atol=1e-5)
    assert len(kernels._compiled_flex) - before == 2
    assert counters["stats"]["unique_graphs"] - frames == 2  # one graph per shape: no graph break, no recompile


# ----- on a GPU -------------------------------------------------------------------------------------------


_USABLE: set = set()


def usable_here(cli):
    """The backends doctor calls usable here in fp16 (probed once per test session: the GPU tests stay short)."""
    if not _USABLE:
        rows = cli.json("doctor", "--dtype", "fp16")["verdicts"]["backends"]
        _USABLE.update(r["backend"] for r in rows if r["status"] == "usable")
    return _USABLE


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(NEW))
def test_gpu_new_backend_within_its_bound_at_sd1_shapes_it_takes(cli, name):
    """Judged at batch 1, timed at batch 2 (flex-compiled: one compile per shape for both). SD 1.x and the VAE
    only (SDXL's for a backend that takes none of theirs: sage1), so that `pytest -m gpu` stays under a minute;
    `doctor --probe` covers every family."""
    from sdcli import backends, diagnosis, hardware, timing

    if name not in usable_here(cli):
        pytest.skip(f"{name} is not usable on this machine")
    machine = hardware.Machine(hardware.probe(measure=False))
    backend = backends.get(name)
    ran = []
    for family, shapes in {**diagnosis.reference_shapes("sd1"), **diagnosis.reference_shapes("vae"),
                           **diagnosis.reference_shapes("sdxl")}.items():
        if ran and family.startswith("SDXL"):
            break
        for heads, head_dim, q_len, kv_len in shapes:
            shape = backends.Shape(heads, head_dim, q_len, kv_len, "fp16")
            if backend.verdict(machine, shape).usable:
                [row] = timing.measure([backend], shape, "cuda", batch=2)
                assert row["ok"], (family, row)
                ran.append(row)
    assert ran


@pytest.mark.gpu
def test_gpu_flex_compiled_compiles_once_for_every_batch():
    """Batch 1 (judging), 2 and 4 (timing, generating) at one shape: one graph, no recompile (the batch is unbacked:
    seen on the CPU, a lead on CUDA's Triton kernel)."""
    import torch
    from torch._dynamo.utils import counters

    from sdcli import backends

    flex = backends.get("flex-compiled")
    frames = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for batch in (1, 2, 4):
            q, k, v = (torch.randn(batch, 256, 8, 40, device="cuda", dtype=torch.float16) for _ in range(3))
            assert torch.allclose(flex.run(q, k, v), sdpa(q, k, v), atol=2e-3)
    assert counters["stats"]["unique_graphs"] - frames == 1


@pytest.mark.gpu
def test_gpu_sage1_padding_keys_break_its_bound():
    """Why sage1 refuses 77 keys: seen in Triton's CPU interpreter (relative error 0.29), here on the GPU."""
    import torch

    from sdcli import backends, numerics

    pytest.importorskip("sageattention")
    q, k, v = (torch.randn(2, n, 10, 64, device="cuda", dtype=torch.float16) for n in (4096, 77, 77))
    acc = numerics.accuracy(backends.get("sage1").run(q, k, v), q, k, v)
    assert acc["rel_error"] > numerics.QUANTIZED_TOL, acc


@pytest.mark.gpu
def test_gpu_sdpa_fa4_runs_flash_attention_4(cli, monkeypatch):
    """The call reaches FlashAttention-4's own forward (counted), not SDPA's FA2."""
    import torch

    if "sdpa-fa4" not in usable_here(cli):
        pytest.skip("sdpa-fa4 is not usable on this machine")
    from flash_attn.cute import interface

    from sdcli import backends

    calls = []
    real = interface._flash_attn_fwd
    monkeypatch.setattr(interface, "_flash_attn_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, k, v = (torch.randn(2, 1024, 8, 80, device="cuda", dtype=torch.float16) for _ in range(3))
    out = backends.get("sdpa-fa4").run(q, k, v)
    assert calls and torch.allclose(out, sdpa(q, k, v), atol=2e-3)


@pytest.mark.gpu
def test_gpu_sdpa_fa4_refusal_is_what_the_bridge_does(cli):
    """Where doctor refuses sdpa-fa4 for torch's FA4 bridge, the call really fails that way (the premise, seen)."""
    import torch

    rows = {r["backend"]: r for r in cli.json("doctor", "--dtype", "fp16")["verdicts"]["backends"]}
    if "FA4 bridge" not in (rows["sdpa-fa4"]["reason"] or "") or torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("sdpa-fa4 is not refused for its bridge here, or this GPU is not SM9x/SM10x")
    from sdcli import kernels

    q, k, v = (torch.randn(2, 1024, 8, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    with pytest.raises(ValueError, match="too many values to unpack"):
        kernels.sdpa_fa4(q, k, v)
