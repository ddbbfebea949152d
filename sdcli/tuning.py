"""Measured plans for `--backend auto`: the fastest backend that keeps the result, per attention shape,
measured once on this machine and remembered.

A plan is keyed by what decides which kernel wins: the GPU (or CPU), the driver, the versions of torch,
diffusers, the kernel packages and every plug-in, the dtype, the model's attention shapes (its
configuration, image size, batch and whether guidance doubles it) and the speed options. On first use it
records the model's real shapes and activations with a one-step render, judges every eligible backend
(exact ones; quantized ones too with `--quantized`) by `sdcli compare`'s rule on two calls at batch 1,
times them at the run's batch (sdcli.timing), and keeps the fastest within its bound. Whatever a
candidate raises, out-of-memory included, drops that candidate. The plan is a JSON file in the cache
directory, reused until `--retune`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from sdcli import backends, lora, routing, timing, validate
from sdcli.backends import Shape
from sdcli.hardware import Machine

def cache_dir() -> Path:
    if os.environ.get("SDCLI_CACHE_DIR"):
        return Path(os.environ["SDCLI_CACHE_DIR"]) / "plans"
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory to be found: a cache of this user's in the temp folder
        import tempfile

        base = Path(tempfile.gettempdir()) / f"sdcli-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return base / "sdcli" / "plans"


def plan_key(run, speed, batch: int, quantized: bool) -> dict:
    """Everything a measured plan depends on, its hash naming the cache file: the machine, the versions, the model
    and size, the `batch` and the speed options (sdcli.options.Speed) as given."""
    machine, pipe = run.machine, run.pipe
    # diffusers' private config keys (e.g. _use_default_values, built from a set) vary between processes
    config = json.dumps([{k: v for k, v in dict(m.config).items() if not k.startswith("_")} for m in routed_models(pipe)],
                        sort_keys=True, default=str)
    plugins = sorted(f"{b.name}@{b.origin}=={b.release}" for b in backends.all_backends() if b.origin != "sdcli")
    sampling = run.options.sampling
    return {
        "machine": machine.gpu_label if machine.is_cuda else f"CPU {run.report.get('system', {}).get('cpu')}",
        "driver": run.report.get("nvml", {}).get("driver"),
        "versions": {k: run.report.get("packages", {}).get(k, {}).get("version") for k in backends.plan_versions()},
        "plugins": plugins,
        "dtype": run.dtype, "vae_dtype": run.vae_dtype,
        "model": run.model_name, "model_config": hashlib.sha256(config.encode()).hexdigest()[:16],
        "width": run.size[0], "height": run.size[1], "batch_size": batch,
        "guidance_doubles_batch": doubles_batch(pipe, sampling.guidance), "quantized": quantized,
        **asdict(speed),
        **({"loras": lora.keys(sampling.loras)} if sampling.loras else {}),  # they change the activations judged
    }


def doubles_batch(pipe, guidance: float) -> bool | float:
    """Whether the pipeline runs classifier-free guidance at this scale (the UNet's batch doubles): diffusers'
    own `do_classifier_free_guidance`, asked with the scale set. Pipelines without it: the scale itself."""
    from types import SimpleNamespace

    rule = getattr(type(pipe), "do_classifier_free_guidance", None)
    try:
        return bool(rule.fget(SimpleNamespace(_guidance_scale=guidance, unet=getattr(pipe, "unet", None))))
    except AttributeError:
        return guidance


def routed_models(pipe) -> list:
    return list(routing.attention_models(pipe).values())


def plan_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{digest}.json"


def collect_shapes(run, one_step, batch: int) -> tuple[list[Shape], dict]:
    """The model's real attention shapes at `batch`, and one real call's inputs per shape (batch 1: q, k, v, mask):
    `one_step(run, batch)` (pipeline.one_step: a one-step render at the run's size), recorded. The render is passed
    in so that tuning does not depend on the pipeline module."""
    router = routing.route(run.pipe, routing.CapturingRouter.for_request("auto", run.machine))
    router.samples = 1  # the judge runs at batch 1
    one_step(run, batch)
    layers = {layer.name: layer for layer in router.layers}
    activations = {}
    for name, (q, k, v, mask) in router.captured.items():
        activations.setdefault(layers[name].shape_of(q, k, mask).key, (q, k, v, mask))
    return routing.seen_shapes(router), activations


def measure_shapes(shapes: list[Shape], machine: Machine, quantized: bool, on_progress=None,
                   everything: bool = False, activations: dict | None = None) -> list[dict]:
    """Judge and time every eligible backend at every shape; the fastest within its accuracy bound is the choice.
    `activations`: Shape.key -> a real call's inputs at that shape (batch 1), to judge accuracy on."""
    entries = []
    for shape in shapes:
        if on_progress:
            on_progress(f"{shape}")
        rows = timing.measure(backends.usable_here(machine, shape, quantized, in_auto_only=not everything), shape,
                              machine.device, batch=shape.batch or 1, activations=(activations or {}).get(shape.key))
        good = [r for r in rows if r["ok"]]
        choice = min(good, key=lambda r: r["ms"])["backend"] if good else None
        entries.append({"shape": asdict(shape), "choice": choice, "measurements": rows})
    return entries


def load_or_tune(run, speed, batch: int, one_step, quantized: bool = False, retune: bool = False,
                 on_progress=None) -> dict:
    """The cached plan for this run's key (at `batch`, with the speed options `speed`), or a new one measured now.
    Returns the plan with `path` and `cached` (whether it came from the cache)."""
    key = plan_key(run, speed, batch, quantized)
    path = plan_path(key)
    if not retune:
        plan, _ = read_plan(path)
        if plan and plan["key"] == key:
            return {**plan, "path": str(path), "cached": True}
    shapes, activations = collect_shapes(run, one_step, batch)
    plan = {"key": key, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shapes": measure_shapes(shapes, run.machine, quantized, on_progress,
                                     activations=activations)}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:  # replaces a damaged file of the same name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(plan, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # no writable cache (a file in its path, a read-only disk, ...) or a folder by the plan's
        try:                # name: the plan still serves this run
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return {**plan, "path": str(path), "cached": False, "not_saved": exc.strerror or str(exc)}
    return {**plan, "path": str(path), "cached": False}


def preferences(plan: dict) -> dict:
    """Shape.key -> backend name, for routing.Router."""
    return {Shape(**{**e["shape"], "batch": None}).key: e["choice"] for e in plan["shapes"] if e["choice"]}


def read_plan(path: Path) -> tuple[dict | None, str | None]:
    """The plan in `path`, or None and why not. The cache is advisory: a damaged or foreign file (not text, not
    JSON, not a plan, a folder, unreadable) is never fatal; `auto` measures again and replaces it."""
    try:
        if path.is_dir():
            return None, "a folder, not a plan"
        plan = json.loads(path.read_bytes().decode())
        validate.conform(plan, validate.PLAN)
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    except UnicodeDecodeError:
        return None, "not text"
    except json.JSONDecodeError as exc:
        return None, f"not JSON ({exc})"
    except validate.Invalid as exc:
        return None, f"not an sdcli plan: {exc}"
    return plan, None


def cached_plans(report: dict, device: str | None = None) -> tuple[list[dict], list[dict]]:
    """The plans measured on this machine (for `sdcli doctor`), and the files in the cache that were skipped:
    [{"path", "why"}]."""
    machine = Machine(report, device)
    label = machine.gpu_label if machine.is_cuda else f"CPU {report.get('system', {}).get('cpu')}"
    plans, skipped = [], []
    for path in sorted(cache_dir().glob("*.json")):
        plan, why = read_plan(path)
        if why:
            skipped.append({"path": str(path), "why": why})
        elif plan["key"]["machine"] == label:
            plans.append({**plan, "path": str(path)})
    return plans, skipped


def plan_rows(plan: dict) -> list[dict]:
    """One row per shape: the choice and how much faster it is than the runner-up and than plain sdpa."""
    rows = []
    for e in plan["shapes"]:
        good = sorted((r for r in e["measurements"] if r["ok"]), key=lambda r: r["ms"])
        sdpa = next((r for r in e["measurements"] if r["backend"] == "sdpa" and r["ok"]), None)
        rows.append({
            "shape": str(Shape(**e["shape"])), "batch": e["shape"].get("batch"), "choice": e["choice"],
            "ms": good[0]["ms"] if good else None,
            "runner_up": good[1]["backend"] if len(good) > 1 else None,
            "runner_up_ms": good[1]["ms"] if len(good) > 1 else None,
            "sdpa_ms": sdpa["ms"] if sdpa else None,
            "refused": [r["backend"] for r in e["measurements"] if not r["ok"]],
        })
    return rows


_FASTEST: dict[tuple, str | None] = {}  # (device, Shape.key, batch, quantized) -> choice, for this process


def fastest(shape: Shape, machine: Machine, quantized: bool = False) -> str | None:
    """The fastest backend within its accuracy bound at `shape`, measured now and remembered for this process:
    how `sdcli.route(pipe, "auto")` chooses at a shape it meets for the first time (no prompt to plan from)."""
    key = (machine.device, shape.key, shape.batch, quantized)
    if key not in _FASTEST:
        _FASTEST[key] = measure_shapes([shape], machine, quantized)[0]["choice"]
    return _FASTEST[key]
