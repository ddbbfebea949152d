"""Helpers of scripts/gpu-evidence.sh: the facts of the environment, one smoke call per backend in a process of its
own, and the fastest backends a compare found. Each prints what the next step reads.

    python scripts/gpu_evidence.py env                          # JSON: libcudart mapped, what imports, versions
    python scripts/gpu_evidence.py smoke doctor.json fp16 OUT   # OUT.jsonl, a line per backend; prints survivors
    python scripts/gpu_evidence.py smoke-one NAME fp16          # one backend, one judged and timed call (JSON)
    python scripts/gpu_evidence.py fastest compare.json 3       # the 3 fastest exact backends that passed
"""

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time

SMOKE_SHAPE = (8, 64, 256, 256)  # heads, head dim, q, kv: a shape every backend here takes (sage1: keys % 64)


def mapped(name: str) -> list[str]:
    """The files of this process whose name holds `name` (e.g. which libcudart the loader picked)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if name in line and "/" in line})
    except OSError:
        return []


def attempt(module: str) -> dict:
    try:
        mod = importlib.import_module(module)
        return {"ok": True, "file": getattr(mod, "__file__", None)}
    except Exception as exc:  # noqa: BLE001 - every failure is a fact to report
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env() -> dict:
    facts: dict = {"python": sys.version.split()[0], "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH"),
                   "PYTHONPATH": os.environ.get("PYTHONPATH"),
                   "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED")}
    facts["versions"] = {d: version(d) for d in ("torch", "triton", "diffusers", "transformers", "xformers",
                                                 "sageattention", "flash-attn-4", "nvidia-cutlass-dsl",
                                                 "nvidia-cuda-runtime-cu12", "nvidia-ml-py")}
    import torch

    facts["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                      "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts["gpu"] = {"name": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_gb": p.total_memory / 2**30,
                        "multiprocessors": p.multi_processor_count}
        torch.zeros(1, device="cuda")  # the runtime is loaded by now
    facts["libcudart_after_torch"] = mapped("libcudart")
    facts["xformers"] = attempt("xformers")
    if facts["xformers"]["ok"]:
        import xformers

        facts["xformers"]["has_cpp_library"] = bool(getattr(xformers, "_has_cpp_library", False))
        failure = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
        if failure is not None:
            facts["xformers"]["load_error"] = repr(failure.__cause__ or failure)[:400]
        facts["xformers"]["ops"] = attempt("xformers.ops")
    facts["libcudart_after_xformers"] = mapped("libcudart")
    facts["sageattention"] = attempt("sageattention")
    facts["cutlass"] = attempt("cutlass")
    facts["flash_attn.cute"] = attempt("flash_attn.cute")
    cache = sys.modules.get("flash_attn.cute.cache_utils")
    facts["flash_attn.cute"]["disk_cache"] = getattr(cache, "CUTE_DSL_CACHE_ENABLED", None)
    return facts


def smoke_one(name: str, dtype: str) -> int:
    import torch

    from sdcli import backends, timing

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = backends.Shape(*SMOKE_SHAPE, dtype)
    t0 = time.perf_counter()
    [row] = timing.measure([backends.get(name)], shape, device, batch=2)
    row["seconds_with_compile"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(row, default=str))
    return 0 if row.get("ok") else 1


def smoke(doctor_json: str, dtype: str, out: str, per_backend_s: int = 30) -> int:
    """Every backend doctor calls usable, one call each in a process of its own: a kernel that leaves a sticky CUDA
    error (an illegal address) can't take the others with it. A line per backend in OUT.jsonl as it finishes; the
    survivors on stdout (comma-separated) and in OUT.txt."""
    rows = json.loads(open(doctor_json).read())["verdicts"]["backends"]
    usable = [r["backend"] for r in rows if r["status"] == "usable"]
    survivors = []
    with open(f"{out}.jsonl", "a") as lines:
        for name in usable:
            t0 = time.perf_counter()
            try:
                done = subprocess.run([sys.executable, __file__, "smoke-one", name, dtype], capture_output=True,
                                      text=True, timeout=per_backend_s)
                code, text = done.returncode, done.stdout.strip().splitlines()[-1:] or [""]
                row = json.loads(text[0]) if text[0].startswith("{") else {"error": done.stderr.strip()[-400:]}
            except subprocess.TimeoutExpired:
                code, row = 124, {"error": f"no answer in {per_backend_s} s"}
            except KeyboardInterrupt:  # the step's time is up: the backends smoked so far are the survivors
                break
            row.update(backend=name, exit=code, seconds=round(time.perf_counter() - t0, 2))
            lines.write(json.dumps(row, default=str) + "\n")
            lines.flush()
            if code == 0:
                survivors.append(name)
    with open(f"{out}.txt", "w") as f:
        f.write(",".join(survivors) + "\n")
    print(",".join(survivors))
    return 0


def fastest(compare_json: str, n: int) -> int:
    """The n fastest exact backends that passed a compare (by its timed run), comma-separated; only those bench
    would measure by default (not the slow-by-design sdpa-math and eager flex, nor flex-compiled)."""
    from sdcli import backends

    try:
        rows = json.loads(open(compare_json).read())["rows"]
    except (OSError, ValueError, KeyError):
        return 1
    good = sorted((r for r in rows if r["verdict"] == "pass" and r["kind"] == "exact" and r.get("seconds")
                   and backends.get(r["backend"]).in_auto), key=lambda r: r["seconds"])
    print(",".join(r["backend"] for r in good[:n]))
    return 0 if good else 1


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "env":
        print(json.dumps(env(), indent=1, default=str))
    elif command == "smoke":
        sys.exit(smoke(*args[:3]))
    elif command == "smoke-one":
        sys.exit(smoke_one(*args))
    elif command == "fastest":
        sys.exit(fastest(args[0], int(args[1])))
    else:
        sys.exit(f"unknown command {command!r}: env, smoke, smoke-one or fastest")
