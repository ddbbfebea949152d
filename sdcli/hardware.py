"""What this machine has, as one plain JSON-serialisable report.

The report is data, not objects, so it can be saved on one machine and judged on another
(`sdcli doctor --report FILE`). Nothing here may raise: a missing GPU, NVML library, driver
function or package becomes a line in the report that says so.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys

from sdcli import backends, kernels
from sdcli._version import __version__
from sdcli.devices import gpu_index, is_cuda
from sdcli.errors import error_line, first_line

SCHEMA = "sdcli.report/1"

def system_info() -> dict:
    ram_gb = None
    try:
        ram_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    cpu = platform.processor() or platform.machine()
    try:  # platform.processor() is empty on most Linux systems
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gb": ram_gb,
    }


def package_info(dists: list[str], module: str) -> dict:
    version = None
    for dist in dists:
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    info = {"version": version, "import_ok": None, "error": None}
    try:
        spec = importlib.util.find_spec(module)
        # A bare folder (a namespace package) is no install: flash-attn-4 ships flash_attn/cute without flash-attn.
        missing = spec is None or (spec.origin is None and not version)
    except ModuleNotFoundError:  # no parent package (flash_attn, for flash_attn.cute)
        missing = True
    except Exception:  # the parent package fails to import: the import below says why
        missing = False
    if missing:
        info["import_ok"] = False if version else None
        if version:
            info["error"] = f"distribution installed but module {module!r} is missing"
        return info
    try:
        mod = importlib.import_module(module)
        info["import_ok"] = True
        module_version = getattr(mod, "__version__", None)
        # "0.0.0" is a placeholder, not a version: flash_attn.cute's always reads so (it looks up a distribution
        # named "fa4"; flash-attn-4's is "flash-attn-4"), so a version comes from the distribution's metadata
        info["version"] = version or (module_version if module_version != "0.0.0" else None)
    except Exception as exc:  # an ABI mismatch raises OSError/RuntimeError/ImportError, all alike here
        info["import_ok"] = False
        info["error"] = error_line(exc)
    return info


def xformers_ops() -> dict:
    """Whether xformers' compiled ops load: its wheels pin one torch version and fail to load on others."""
    out: dict = {"ops_ok": None, "built_for_torch": None}
    try:
        requires = importlib.metadata.requires("xformers") or []
        out["built_for_torch"] = next(
            (r.split("==", 1)[1].split(";")[0].strip() for r in requires if r.replace(" ", "").startswith("torch==")),
            None,
        )
    except importlib.metadata.PackageNotFoundError:
        return out
    try:
        import xformers

        out["ops_ok"] = bool(getattr(xformers, "_has_cpp_library", False))
    except Exception as exc:
        out["ops_ok"] = False
        out["error"] = error_line(exc)
        return out
    try:  # wheels without a torch== pin (0.0.35: torch>=2.10) record their build in cpp_lib.json (cuda 1208: 12.8)
        with open(os.path.join(os.path.dirname(xformers.__file__), "cpp_lib.json")) as f:
            build = json.load(f).get("version", {})
        out["built_for_torch"] = out["built_for_torch"] or build.get("torch")
        out["built_for_cuda"] = f"{build['cuda'] // 100}.{build['cuda'] % 100}" if build.get("cuda") else None
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    if not out["ops_ok"]:  # why the compiled ops did not load, e.g. "libcudart.so.12: cannot open shared object file"
        failure = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
        if failure is not None:
            out["load_error"] = error_line(failure.__cause__ or failure)
    try:  # what diffusers imports; when it fails diffusers turns xformers off and calls it "too old"
        import xformers.ops  # noqa: F401
    except Exception as exc:  # e.g. flash-attn-4's bare flash_attn/: "No module named 'flash_attn.flash_attn_interface'"
        out["ops_import_error"] = error_line(exc)
    return out


def diffusers_backends() -> dict:
    """diffusers' own verdict on each of its attention backends: None where it can use it, else its message.
    diffusers decides with its own availability and version checks (e.g. FlashAttention-3 only as a findable
    `flash_attn_3` module), so sdcli asks it instead of copying them."""
    try:
        from diffusers.models import attention_dispatch
    except Exception as exc:
        return {"error": error_line(exc)}
    verdicts = {}
    for name in attention_dispatch.AttentionBackendName:
        try:
            attention_dispatch._check_attention_backend_requirements(name)
            verdicts[name.value] = None
        except Exception as exc:
            verdicts[name.value] = first_line(exc)
    return verdicts


def nvml_gpus() -> tuple[list[dict], dict]:
    """GPUs as NVML sees them, plus driver facts. NVML works without torch and without CUDA torch."""
    status = {"available": False, "error": None, "driver": None, "cuda_driver": None}
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:
        status["error"] = error_line(exc)
        return [], status
    gpus = []
    try:
        status["available"] = True
        status["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            v = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            status["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception as exc:  # very old drivers lack this call
            status["error"] = error_line(exc)
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpu = {"index": i, "source": "nvml", "name": _text(pynvml.nvmlDeviceGetName(h))}
            try:
                gpu["uuid"] = _text(pynvml.nvmlDeviceGetUUID(h))
            except Exception:
                gpu["uuid"] = None
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                gpu["compute_capability"] = f"{major}.{minor}"
            except Exception:
                gpu["compute_capability"] = None
            try:
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                gpu["memory_total_gb"] = round(mem.total / 2**30, 2)
                gpu["memory_free_gb"] = round(mem.free / 2**30, 2)
            except Exception:
                gpu["memory_total_gb"] = gpu["memory_free_gb"] = None
            gpu["multiprocessors"] = None  # NVML has no SM count; torch fills it in below
            gpus.append(gpu)
    except Exception as exc:
        status["error"] = error_line(exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return gpus, status


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def torch_info(only: int | None = None) -> tuple[dict, list[dict]]:
    """`only`: read free memory of that GPU alone (reading it makes a CUDA context on the GPU)."""
    info: dict = {"version": None, "cuda": None, "cudnn": None, "cuda_available": False, "device_count": 0}
    gpus: list[dict] = []
    try:
        import torch
    except Exception as exc:
        info["error"] = error_line(exc)
        return info, gpus
    info["version"] = torch.__version__
    info["cuda"] = torch.version.cuda
    try:  # SDPA flash kernels torch can swap in (torch.nn.attention.activate_flash_attention_impl): e.g. FA3, FA4
        from torch.nn import attention

        info["flash_attention_impls"] = attention.list_flash_attention_impls()
    except (ImportError, AttributeError):  # a torch from before the switch
        info["flash_attention_impls"] = []
    try:
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        info["cudnn"] = None
    try:
        info["cuda_available"] = torch.cuda.is_available()
        info["device_count"] = torch.cuda.device_count() if info["cuda_available"] else 0
        for i in range(info["device_count"]):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i) if only in (None, i) else (None, p.total_memory)
            gpus.append({
                "index": i, "source": "torch", "name": p.name, "uuid": str(getattr(p, "uuid", "") or "") or None,
                "compute_capability": f"{p.major}.{p.minor}",
                "memory_total_gb": round(total / 2**30, 2),
                "memory_free_gb": round(free / 2**30, 2) if free is not None else None,
                "multiprocessors": p.multi_processor_count,
            })
    except Exception as exc:  # e.g. a driver too old for this torch's CUDA
        info["error"] = error_line(exc)
    return info, gpus


def same_gpus(nv_gpus: list[dict], torch_gpus: list[dict]) -> list[dict]:
    """The GPUs this process can use, by their CUDA index (what `cuda:N` names), each with NVML's facts where NVML
    knows the same GPU. Matched by UUID, not by index: NVML counts every GPU in PCI bus order, CUDA only those in
    CUDA_VISIBLE_DEVICES and, by default, fastest first. Without a CUDA torch, NVML's list as it is (doctor then says
    torch can't use them)."""
    if not torch_gpus:
        return nv_gpus
    by_uuid = {_uuid(g.get("uuid")): g for g in nv_gpus if g.get("uuid")}
    gpus = []
    for gpu in torch_gpus:
        twin = by_uuid.get(_uuid(gpu.get("uuid")))
        if twin is None:
            gpus.append(gpu)
            continue
        gpus.append({**twin, "index": gpu["index"], "nvml_index": twin["index"],
                     "multiprocessors": gpu["multiprocessors"],
                     "memory_free_gb": twin.get("memory_free_gb") if twin.get("memory_free_gb") is not None
                     else gpu.get("memory_free_gb")})
    return gpus


def _uuid(text: str | None) -> str:
    """NVML writes "GPU-5d3c...", torch "5d3c...": the same UUID."""
    return (text or "").lower().removeprefix("gpu-")


def measure_dtypes(cuda: bool, gpu: int = 0) -> dict:
    """Run a small matmul in each dtype and compare with fp32: supported means it ran and agreed."""
    result: dict = {"device": f"cuda:{gpu}" if cuda else "cpu"}
    try:
        import torch
    except Exception as exc:
        return {**result, "error": error_line(exc)}
    device = result["device"]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=gen).to(device)
    b = torch.randn(64, 64, generator=gen).to(device)
    ref = a @ b
    for name, dtype, tol in (("fp16", torch.float16, 0.05), ("bf16", torch.bfloat16, 0.3)):
        try:
            out = (a.to(dtype) @ b.to(dtype)).float()
            ok = bool(torch.allclose(out, ref, atol=tol * 8, rtol=tol))
            result[name] = {"supported": ok, "how": "measured"}
        except Exception as exc:
            result[name] = {"supported": False, "how": "measured", "detail": error_line(exc)}
    if not cuda:
        na = {"supported": False, "how": "not measured", "detail": "no CUDA GPU"}
        return {**result, "tf32": dict(na), "fp8_e4m3": dict(na)}
    try:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = a @ b
        torch.backends.cuda.matmul.allow_tf32 = old
        # TF32 keeps 10 mantissa bits, so a TF32 matmul differs from the fp32 one; identical means no TF32.
        result["tf32"] = {"supported": not torch.equal(tf32, ref), "how": "measured"}
    except Exception as exc:
        result["tf32"] = {"supported": False, "how": "measured", "detail": error_line(exc)}
    try:
        f8 = torch.float8_e4m3fn
        one = torch.ones((), device=device)
        out = torch._scaled_mm(a.to(f8), b.t().contiguous().t().to(f8), scale_a=one, scale_b=one,
                               out_dtype=torch.bfloat16)
        out = out[0] if isinstance(out, tuple) else out
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        result["fp8_e4m3"] = {"supported": rel < 0.2, "how": "measured"}
    except Exception as exc:
        result["fp8_e4m3"] = {"supported": False, "how": "measured", "detail": error_line(exc)}
    return result


def probe(measure: bool = True, only_gpu: int | None = None) -> dict:
    """The whole report. `measure=False` skips running anything on the device (dtype checks). `only_gpu`: the one
    GPU this process uses; no other is touched (each rank of a multi-GPU run probes only its own, so that no
    GPU holds a CUDA context of every rank)."""
    nv_gpus, nvml = nvml_gpus()
    torch_data, torch_gpus = torch_info(only_gpu)
    gpus = same_gpus(nv_gpus, torch_gpus)
    kernels.fa4_disk_cache()  # before flash_attn.cute is first imported (below), which reads the setting once
    packages = {p.key: package_info(list(p.dists), p.module) for p in backends.packages()}  # the registered ones'
    if packages.get("flash_attn_4", {}).get("import_ok"):
        cache = sys.modules.get("flash_attn.cute.cache_utils")
        packages["flash_attn_4"]["disk_cache"] = getattr(cache, "CUTE_DSL_CACHE_ENABLED", None)
    if packages.get("xformers", {}).get("version"):
        packages["xformers"].update(xformers_ops())
    report = {
        "schema": SCHEMA,
        "sdcli": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "system": system_info(),
        "nvml": nvml,
        "gpus": gpus,
        "torch": torch_data,
        "packages": packages,
        "diffusers_backends": diffusers_backends(),
    }
    if measure:
        report["dtypes"] = measure_dtypes(bool(torch_data["cuda_available"]), only_gpu or 0)
    return report


class Machine:
    """Read-only view of a hardware report, for one target device ('cuda:N' or 'cpu')."""

    def __init__(self, report: dict, device: str | None = None):
        self.report = report
        gpus = report.get("gpus") or []
        cuda_ok = bool(report.get("torch", {}).get("cuda_available")) and bool(gpus)
        index = gpu_index(device or ("cuda" if cuda_ok else "cpu"))
        self.device = "cpu" if index is None else f"cuda:{index}"
        self.is_cuda = index is not None
        self.gpu = next((g for g in gpus if g.get("index") == index), None)

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        cc = (self.gpu or {}).get("compute_capability")
        return tuple(int(x) for x in cc.split(".")) if cc else None

    @property
    def gpu_label(self) -> str:
        if not self.gpu:
            return "CPU"
        cc = self.gpu.get("compute_capability")
        return f"{self.gpu['name']} (SM{cc.replace('.', '')})" if cc else self.gpu["name"]

    def package(self, key: str) -> dict:
        return self.report.get("packages", {}).get(key) or {"version": None, "import_ok": None}

    def dtype_supported(self, name: str) -> bool | None:
        return (self.report.get("dtypes", {}).get(name) or {}).get("supported")

    def diffusers_refusal(self, name: str) -> str | None:
        """diffusers' own message for why it can't use its backend `name` here (see diffusers_backends); None
        when it can, or when the report predates that section."""
        return (self.report.get("diffusers_backends") or {}).get(name)


def use_threads(threads: int | None, device: str | None) -> str | None:
    """Give torch `threads` CPU threads (None: torch's own, one per core), and for a run on the CPU say when the
    machine is too busy for them. torch's threads wait for each other at every operation: with other processes on
    the cores, a tiny image took 20-70 times as long with two threads as with one (docs/notebook.md, "Threads")."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if is_cuda(device) or (device != "cpu" and torch.cuda.is_available()):
        return None  # a GPU run: the CPU threads only feed it
    used = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average here (Windows)
        return None
    if used > 1 and load > cores - 0.5:
        return (f"this machine is busy (load average {load:.1f} on {cores} cores) and torch runs {used} threads, "
                "which then wait for each other: --threads 1 can be many times faster here")
    return None


def default_dtype(machine: Machine) -> str:
    """The dtype sdcli runs in by default: bf16 where measured to work on the GPU, fp16 on older GPUs."""
    if not machine.is_cuda:
        return "fp32"
    return "bf16" if machine.dtype_supported("bf16") and (machine.compute_capability or (0, 0)) >= (8, 0) else "fp16"
