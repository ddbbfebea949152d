"""`sdcli doctor` as data: what this machine (or a saved report) can run, and how well.

Judging is the registry's checks applied to a hardware report: every backend's verdict for the
machine, and which layer shapes of the Stable Diffusion models it could serve. The probe runs each
usable backend at those shapes. Everything here returns plain data; views.py draws it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdcli import devices, hardware, numerics, timing, validate
from sdcli.backends import BROKEN, Backend, Shape, all_backends, plugin_errors, usable_here
from sdcli.errors import SdcliError, plural
from sdcli.hardware import Machine

# The attention shapes of the models sdcli is for (../shared/FACTS.md): (heads, head_dim, q_len, kv_len).
REFERENCE_SHAPES = {
    "SD 1.x 512²": [(8, 40, 4096, 4096), (8, 40, 4096, 77), (8, 80, 1024, 1024), (8, 160, 256, 256), (8, 160, 64, 77)],
    "SD 2.x 768²": [(5, 64, 9216, 9216), (10, 64, 2304, 77), (20, 64, 576, 576)],
    "SDXL 1024²": [(10, 64, 4096, 4096), (10, 64, 4096, 77), (20, 64, 1024, 1024)],
    # joint attention: 4096 image tokens + 77 CLIP + 256 T5 (SD 3) or + 512 T5 (Flux); Medium's second
    # attention is over the image tokens alone
    "SD 3.5 Medium 1024²": [(24, 64, 4429, 4429), (24, 64, 4096, 4096)],
    "SD 3.5 Large 1024²": [(38, 64, 4429, 4429)],
    "Flux.1 1024²": [(24, 128, 4608, 4608)],
    "VAE 512²": [(1, 512, 4096, 4096)],
}
# On a CPU the full 4096-9216-long sequences take minutes; the heads and head dims are what differ.
CPU_PROBE_SEQ = 1024


def reference_shapes(family: str | None = None) -> dict:
    """REFERENCE_SHAPES, or the families whose name holds `family` (case, spaces and dots ignored: "sdxl",
    "sd1", "sd 3.5", "flux", "vae"); none matching is bad input."""
    if family is None:
        return REFERENCE_SHAPES
    squash = lambda text: re.sub(r"[\s.]", "", text.lower())  # noqa: E731
    chosen = {name: shapes for name, shapes in REFERENCE_SHAPES.items() if squash(family) in squash(name)}
    if not family.strip() or not chosen:
        raise SdcliError(f"--family {family!r} matches none of: {', '.join(REFERENCE_SHAPES)}")
    return chosen


def serves(backend: Backend, machine: Machine, dtype: str, families: dict) -> dict:
    """Which reference layer shapes the backend takes: {family: {"ok": n, "of": m, "refused": [why, ...]}}."""
    out = {}
    for family, shapes in families.items():
        verdicts = [backend.verdict(machine, Shape(h, d, q, kv, dtype)) for h, d, q, kv in shapes]
        refused = list(dict.fromkeys(v.reason for v in verdicts if not v.usable))
        out[family] = {"ok": sum(v.usable for v in verdicts), "of": len(shapes), "refused": refused}
    return out


def assess(report: dict, device: str | None = None, dtype: str | None = None, families: dict = REFERENCE_SHAPES) -> dict:
    """Every backend's verdict for this machine, and which layers of `families` it could serve."""
    machine = Machine(report, device)
    dtype = dtype or hardware.default_dtype(machine)
    rows = []
    for backend in all_backends():
        v = backend.verdict(machine)
        rows.append({
            "backend": backend.name, "kind": backend.kind, "origin": backend.origin, "summary": backend.summary,
            "status": v.status, "reason": v.reason, "fix": v.fix,
            "serves": serves(backend, machine, dtype, families) if v.usable else None,
        })
    for name, error in plugin_errors().items():
        rows.append({"backend": name, "kind": "?", "origin": "plugin", "summary": "failed to load",
                     "status": BROKEN, "reason": error, "fix": f"fix or uninstall the package behind {name!r}",
                     "serves": None})
    return {"device": machine.device, "gpu": machine.gpu_label, "dtype": dtype, "backends": rows}


def probe_kernels(report: dict, verdicts: dict, on_progress=None, families: dict = REFERENCE_SHAPES) -> tuple[list, dict | None]:
    """Run every usable backend at each self-attention shape of `families` it takes: judged against exact
    attention by compare's rule (why, when it fails) and timed. on_progress(text, total) before each shape.
    Returns the rows, and None, or after Ctrl-C (or a time limit's SIGINT) the rows of the shapes finished and
    what was left: {shapes_done, shapes_planned, families_left}."""
    cap = None if devices.is_cuda(verdicts["device"]) else CPU_PROBE_SEQ
    shapes, owners = [], {}
    for family, items in families.items():
        for heads, head_dim, q, kv in items:
            shape = Shape(heads, head_dim, min(q, cap or q), min(kv, cap or kv), verdicts["dtype"])
            if kv != 77 and shape not in shapes:  # self-attention only: the big calls, where kernels differ
                shapes.append(shape)
            owners.setdefault(shape, []).append(family)
    machine = Machine(report, verdicts["device"])
    results = []
    for done, s in enumerate(shapes):
        if on_progress:
            on_progress(f"backends at {s}", len(shapes))
        try:
            results += timing.measure(usable_here(machine, s), s, verdicts["device"])
        except KeyboardInterrupt:
            left = dict.fromkeys(f for shape in shapes[done:] for f in owners[shape])
            return results, {"shapes_done": done, "shapes_planned": len(shapes),
                             "families_left": [family_option(f) for f in left]}
    return results, None


# The --family value that picks each family alone (reference_shapes matches on a part of the name)
FAMILY_OPTIONS = {"SD 1.x 512²": "sd1", "SD 2.x 768²": "sd2", "SDXL 1024²": "sdxl",
                  "SD 3.5 Medium 1024²": "'sd3.5 medium'", "SD 3.5 Large 1024²": "'sd3.5 large'",
                  "Flux.1 1024²": "flux", "VAE 512²": "vae"}


def family_option(family: str) -> str:
    return FAMILY_OPTIONS.get(family, f"'{family}'")


PROBE_FAILED = "failed the probe"


def probe_verdicts(verdicts: dict, probed: list[dict]) -> None:
    """After --probe the verdict is the probe's: a backend the checks call usable but that failed (raised, or broke
    its accuracy bound) at a probed shape says so, with the first such shape and why."""
    for row in verdicts["backends"]:
        failed = [p for p in probed if p["backend"] == row["backend"] and not p["ok"]]
        if row["status"] == "usable" and failed:
            first = failed[0]
            more = f" (and {plural(len(failed) - 1, 'more shape')})" if len(failed) > 1 else ""
            why = first.get("error") or first.get("why")
            row.update(status=PROBE_FAILED, reason=f"at {first['shape']}: {why}{more}",
                       fix=f"see sdcli compare --backends {row['backend']}; auto leaves it out where it fails")


def load_report(path: Path) -> dict:
    """A saved `sdcli doctor --json` (or the bare report in it), checked to be one."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SdcliError(f"cannot read report {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdcliError(f"{path} is not a JSON report ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("report"), dict):  # a saved `sdcli doctor --json`
        data = data["report"]
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("sdcli.report/"):
        raise SdcliError(f"{path} is not an sdcli report (make one with: sdcli doctor --json > report.json)")
    return validate.report(data, path)


def diagnose(report: Path | None = None, probe: bool = False, device: str | None = None,
             dtype: str | None = None, on_progress=None, family: str | None = None) -> dict:
    """The whole doctor report: the machine (probed now, or read from `report`), every backend's verdict, the
    probe's measurements (if asked) and the measured plans cached for this machine; with `family`, the layer
    shapes judged and probed are that family's alone."""
    families = reference_shapes(family)
    if dtype is not None and dtype not in numerics.DTYPES:
        raise SdcliError(f"--dtype must be one of {', '.join(numerics.DTYPES)}, not {dtype!r}")
    devices.parse(device, auto=False)
    if report and probe:
        raise SdcliError("--probe runs kernels on this machine; it can't be combined with --report")
    data = load_report(report) if report else hardware.probe()
    devices.in_report(device, data)
    verdicts = assess(data, device, dtype, families)
    probed, cut = probe_kernels(data, verdicts, on_progress, families) if probe else (None, None)
    if probed:
        probe_verdicts(verdicts, probed)
    from sdcli import tuning  # loads torch: after the checks, so that bad input fails fast

    # plans measured on this machine, and the cache files that are not plans
    plans, skipped = ([], []) if report else tuning.cached_plans(data, device)
    result = {"report": data, "verdicts": verdicts, "probe": probed, "plans": plans, "skipped_cache_files": skipped}
    if cut:
        result["probe_interrupted"] = cut
    return result
