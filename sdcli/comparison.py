"""`sdcli compare`: the same prompt and seed through every backend, and whether the image changed.

Denoising amplifies tiny differences over many steps, so three levels of evidence are kept apart:
- kernel: the real q/k/v of every attention layer, captured during the reference run, replayed
  through each backend, and sampled q/k/v of realistic magnitude once per layer shape, compared with
  exact attention (fp32 math, fp64 for fp32 runs);
- one step: the latent after the first denoising step;
- final image: PSNR, SSIM (torchmetrics) and the largest pixel difference.

The verdict follows the backend's promise, judged call by call. An exact kernel may err at most
`exact_tol` times the rounding of the call's exact result to the run's dtype (sdcli.numerics; calibrated
in docs/bound.md); a quantized kernel may be off by at most `quantized_tol` relative error. Every run
starts from the same latents, and layers a backend can't take fall back to the reference backend, so a
difference is that backend's alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from sdcli import backends, devices, hardware, numerics, pipeline, routing, timing
from sdcli.backends import EXACT, Backend
from sdcli.errors import Interrupted, SdcliError, error_line, plural
from sdcli.images import write_new
from sdcli.options import Options

PASS, FAIL, FAILED, REFERENCE = "pass", "FAIL", "failed", "reference"
REFERENCE_BACKEND = "sdpa-math"  # the most exact backend: SDPA's math kernel
NOT_APPLICABLE = "n/a"       # usable here, but no layer of this model has a shape it takes: nothing to judge
NOT_JUDGED = "not judged"    # interrupted before its kernel-level check finished


@dataclass(frozen=True)
class Thresholds:
    exact_tol: float = numerics.EXACT_TOL          # × the rounding of the exact result to the run's dtype
    quantized_tol: float = numerics.QUANTIZED_TOL  # relative L2 error (SageAttention 2 reports ~0.01-0.05)

    def __post_init__(self):
        if not all(math.isfinite(t) and t > 0 for t in (self.exact_tol, self.quantized_tol)):
            raise SdcliError(f"--exact-tol and --quantized-tol must be positive, finite numbers, not "
                             f"{self.exact_tol} and {self.quantized_tol}")


def choose(machine: hardware.Machine, names: list[str] | None, reference: str | None) -> tuple[Backend, list[Backend]]:
    """The reference (default: the most exact backend here, SDPA's math kernel) and the backends to compare
    (default: every one usable on this machine)."""
    ref = backends.get(reference or REFERENCE_BACKEND)
    chosen = [backends.get(n) for n in names] if names else None
    if not ref.verdict(machine).usable:
        raise SdcliError(f"reference backend {ref.name} can't run here: {ref.verdict(machine).reason}")
    if chosen is None:
        chosen = backends.usable_here(machine)
    return ref, [b for b in chosen if b.name != ref.name]


def kernel_errors(captured: dict[str, tuple], candidates: list[Backend], machine: hardware.Machine, layers,
                  t: Thresholds) -> tuple[dict[str, list[dict]], dict[str, str], bool]:
    """Judge each backend on every captured layer's real inputs, and once per distinct layer shape on sampled
    inputs of realistic magnitude (numerics.sampled_call, the inputs auto's tuner also uses): a fault that a
    flat layer hides (e.g. a wrong softmax scale on near-uniform attention) shows there. Each call: the error
    against wide-dtype math, in units of rounding, and whether it is within the backend's bound; each baseline is
    computed once for all backends. Returns rows per backend (status "ok", "n/a" where its checks refuse the shape,
    "failed" where its kernel raised), the backends that ran out of memory (they are reported as failed, like a
    crash), and whether Ctrl-C cut it short (the rows so far are kept)."""
    info = {l.name: l for l in layers}
    cases, sampled = [], set()
    for name, (q, k, v, mask) in captured.items():
        shape = info[name].shape_of(q, k, mask)
        cases.append(({"layer": name, "inputs": "captured"}, shape, (q, k, v, mask)))
        if shape.key not in sampled:
            sampled.add(shape.key)
            cases.append(({"layer": f"sampled {shape}", "inputs": "sampled"}, shape,
                          lambda shape=shape, device=q.device: numerics.sampled_call(shape, device)))
    rows = {b.name: [] for b in candidates}
    failed: dict[str, str] = {}
    try:
        _judge_cases(cases, candidates, machine, t, rows, failed)
    except KeyboardInterrupt:
        return rows, failed, True
    return rows, failed, False


def _judge_cases(cases, candidates, machine, t, rows: dict, failed: dict) -> None:
    import torch

    for label, shape, call in cases:
        call = call() if callable(call) else call
        base = None
        for backend in candidates:
            if backend.name in failed:
                continue
            row = {**label, "shape": str(shape)}
            verdict = backend.verdict(machine, shape)
            if not verdict.usable:
                rows[backend.name].append({**row, "status": "n/a", "refusal": verdict.status, "why": verdict.reason})
                continue
            try:
                with torch.inference_mode(), numerics.full_fp32():
                    base = base or numerics.baseline(*call)
                    acc = numerics.accuracy(backend.run(*call[:3], attn_mask=call[3]), *call, base=base)
            except Exception as exc:
                if devices.recovered(exc):
                    failed[backend.name] = error_line(exc)
                    continue
                rows[backend.name].append({**row, "status": "failed", "why": f"kernel failed: {error_line(exc)}"})
                continue
            rows[backend.name].append({**row, "status": "ok", **acc,
                                       "within_bound": numerics.within_bound(backend.kind, acc, t.exact_tol,
                                                                             t.quantized_tol),
                                       "why": numerics.bound_text(backend.kind, acc, t.exact_tol, t.quantized_tol)})


def image_metrics(image, reference) -> dict:
    """PSNR and SSIM (torchmetrics) and the largest pixel difference, on [0, 1] float images (H, W, C)."""
    import numpy as np
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = torch.from_numpy(np.nan_to_num(image, nan=0.0)).permute(2, 0, 1)[None].double()
    b = torch.from_numpy(reference).permute(2, 0, 1)[None].double()
    max_diff = float((a - b).abs().max()) * 255
    identical = max_diff == 0  # PSNR is infinite then; JSON has no infinity, so it is null with identical=true
    return {"identical": identical,
            "psnr_db": None if identical else float(peak_signal_noise_ratio(a, b, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(a, b, data_range=1.0)),
            "max_abs_diff": round(max_diff, 3)}


@dataclass
class Outcome:
    backend: str
    kind: str
    image: object = None          # float array (H, W, C) in [0, 1]
    step_latent: object = None
    seconds: float | None = None
    peak_memory_gb: float | None = None
    served: dict = field(default_factory=dict)
    fallback_layers: int = 0
    layers: int = 0
    problem: str | None = None
    error: str | None = None


def render_with(run: pipeline.Run, router: routing.Router, item: pipeline.Item, warmup: bool) -> Outcome:
    """One image through `router`, after an untimed 1-step warm-up (kernel loading, autotuning)."""
    if warmup:
        routing.route(run.pipe, router.fresh())
        pipeline.render(run, [item], steps=1)
    routing.route(run.pipe, router)
    first = {}

    def on_step(step, latents):
        if step == 0:
            first["latent"] = latents.detach().float().clone()

    with devices.peak_memory(run.device, above_start=True) as peak, timing.stopwatch(run.device) as watch:
        images, problems = pipeline.render(run, [item], on_step)
    first_name = router.chain[0].name
    return Outcome(
        router.requested, router.chain[0].kind, image=images[0], step_latent=first.get("latent"), seconds=watch.seconds,
        peak_memory_gb=peak.gb,
        served=dict(router.served()), layers=len(router.layers), problem=problems[0],
        fallback_layers=sum(1 for l in router.layers if first_name in l.refused and l.served()))


def load(options: Options, names: list[str] | None = None, reference: str | None = None,
         report: dict | None = None) -> pipeline.Run:
    """The options' model, loaded with the reference's routing, for `compare`: bad options, and backends that are
    unknown or a reference that can't run here, fail before it loads."""
    options = pipeline.resolve(replace(options, attention=replace(options.attention, backend=reference or REFERENCE_BACKEND)))
    machine = pipeline.machine_for(options, report)
    choose(machine, names, reference)
    return pipeline.prepare(options, machine, judged=True)


def compare(run: pipeline.Run, names: list[str] | None = None, reference: str | None = None,
            thresholds: Thresholds | None = None, on_progress=None) -> dict:
    """Run the reference and every backend on the run's first item; return rows with verdicts and images.
    The pipeline's routing is put back as it was."""
    thresholds = thresholds or Thresholds()
    ref, others = choose(run.machine, names, reference)
    say = on_progress or (lambda text: None)
    machine = run.machine
    item = pipeline.work_items(run.options)[0]
    saved = routing.snapshot(run.pipe)
    try:
        outcomes, ref_router = render_all(run, item, ref, others, say)
    finally:
        routing.restore(run.pipe, saved)
    reference_out = outcomes[0]
    rendered = [b for b, o in zip(others, outcomes[1:]) if not o.error]
    say("kernel level: every captured layer through every backend")
    kernel_rows, ran_out, cut = kernel_errors(ref_router.captured, rendered, machine, ref_router.layers, thresholds)
    for o in outcomes:
        if o.backend in ran_out:  # of memory: reported as failed, like a crash
            o.error = ran_out[o.backend]

    unjudged = {b.name for b in rendered} if cut else set()
    rows = [verdict_row(o, reference_out, kernel_rows.get(o.backend), thresholds, is_reference=o is reference_out,
                      judged=o.backend not in unjudged) for o in outcomes]
    result = {
        "model": run.model_name, "prompt": item.prompt, "seed": item.seed, "steps": run.options.sampling.steps,
        "device": run.device, "gpu": machine.gpu_label, "dtype": run.dtype, "vae_dtype": run.vae_dtype,
        "reference": ref.name, "thresholds": thresholds.__dict__, "rows": rows,
        "passed": all(r["verdict"] in (PASS, REFERENCE, NOT_APPLICABLE) for r in rows),
        "_images": {o.backend: o.image for o in outcomes if o.image is not None},
    }
    left = [b.name for b in others if b.name in unjudged or b.name not in {o.backend for o in outcomes}]
    if left:  # Ctrl-C (or a time limit's SIGINT): what finished is kept; these are what a second run would do
        result["passed"] = False
        result["interrupted"] = {"backends_done": len(others) - len(left), "backends_planned": len(others),
                                 "left": left}
    return result


def render_all(run: pipeline.Run, item: pipeline.Item, ref: Backend, others: list[Backend], say):
    """The reference's image (capturing each layer's inputs), then each backend's with the reference serving the
    layers it can't take. Returns the outcomes, reference first, and the reference's router; Ctrl-C after the
    reference ends the list early (the outcomes so far are kept), before it there is nothing to keep."""
    say(f"reference: {ref.name}")
    ref_router = routing.CapturingRouter.for_request(ref.name, run.machine)
    try:
        reference_out = render_with(run, ref_router, item, warmup=True)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted in the reference run ({ref.name}): nothing was compared yet") from None
    if reference_out.problem:
        raise SdcliError(f"the reference run with {ref.name} came out bad: {reference_out.problem}")
    outcomes = [reference_out]
    for backend in others:
        say(f"{backend.name}")
        router = routing.Router.for_request(backend.name, run.machine, fallback=ref.name)
        try:
            outcome = render_with(run, router, item, warmup=True)
        except KeyboardInterrupt:
            break
        except Exception as exc:  # a backend that crashes is reported; the others still run
            outcome = Outcome(backend.name, backend.kind, error=error_line(exc))
            devices.release_memory()
        outcomes.append(outcome)
    return outcomes, ref_router


def verdict_row(o: Outcome, ref: Outcome, kernels: list[dict] | None, t: Thresholds, is_reference: bool,
              judged: bool = True) -> dict:
    row = {"backend": o.backend, "kind": o.kind, "seconds": o.seconds, "peak_memory_gb": o.peak_memory_gb,
           "served": o.served, "layers": o.layers, "fallback_layers": o.fallback_layers, "error": o.error}
    if is_reference:
        return {**row, "verdict": REFERENCE, "why": "the reference", "kernel": None, "step_rel_error": 0.0,
                "identical": True, "psnr_db": None, "ssim": 1.0, "max_abs_diff": 0.0}
    if o.error:
        return {**row, "verdict": FAILED, "why": o.error, "kernel": None}
    row["step_rel_error"] = numerics.relative_error(o.step_latent, ref.step_latent) if o.step_latent is not None else None
    row.update(image_metrics(o.image, ref.image))
    measured = [k for k in kernels or [] if k["status"] == "ok"]
    worst_ratio = max(measured, key=lambda k: k["ratio"], default=None)
    worst_err = max(measured, key=lambda k: k["rel_error"], default=None)
    row["kernel"] = {
        "layers_measured": sum(k["inputs"] == "captured" for k in measured),
        "shapes_sampled": sum(k["inputs"] == "sampled" for k in measured),
        "layers_na": sum(k["inputs"] == "captured" and k["status"] != "ok" for k in kernels or []),
        "max_rel_error": worst_err["rel_error"] if worst_err else None,
        "max_rel_error_layer": worst_err["layer"] if worst_err else None,
        "max_ratio": worst_ratio["ratio"] if worst_ratio else None,
        "max_ratio_layer": worst_ratio["layer"] if worst_ratio else None,
        "calls_outside_bound": sum(not k["within_bound"] for k in measured),
        "per_layer": kernels,
    }
    if not judged:
        return {**row, "verdict": NOT_JUDGED, "why": "interrupted before its kernel-level check finished"}
    served_by_it = o.served.get(o.backend, 0)
    if not served_by_it:
        refused = list(dict.fromkeys(k["why"] for k in kernels or [] if k["status"] == "n/a"))
        if kernels and all(k.get("refusal") == backends.UNSUPPORTED_SHAPE for k in kernels):  # no kernel at fault
            return {**row, "verdict": NOT_APPLICABLE, "why": f"takes no layer of this model ({'; '.join(refused)})"}
        failures = [k["why"] for k in kernels or [] if k["status"] == "failed"]
        why = failures[0] if failures else f"can't run here: {refused[0]}" if refused else "no layer"
        return {**row, "verdict": FAILED, "why": f"served no attention call ({why})"}
    if any(not k["finite"] for k in measured):
        return {**row, "verdict": FAIL, "why": "non-finite attention output"}
    if o.problem:
        return {**row, "verdict": FAIL, "why": o.problem}
    outside = [k for k in measured if not k["within_bound"]]
    of = f"{len(outside)} of {plural(len(measured), 'call')} outside it"
    if o.kind == EXACT:
        dtypes = "/".join(sorted({k["shape"].split()[-1] for k in measured}))
        bound = f"≤ {t.exact_tol:g}× the rounding of the exact result to {dtypes}"
        why = (f"kernel error {worst_ratio['ratio']:.2f}× rounding at {worst_ratio['layer']}, bound {t.exact_tol:g}×"
               f" ({of})" if worst_ratio else "no layer measured")
    else:
        bound = f"relative error ≤ {t.quantized_tol:g} in every layer"
        why = (f"kernel error {worst_err['rel_error']:.3g} at {worst_err['layer']}, bound {t.quantized_tol:g} ({of})"
               if worst_err else "no layer measured")
    return {**row, "verdict": FAIL if outside else PASS, "why": why, "bound": bound}


def grid(images: dict, rows: list[dict], reference: str):
    """Side-by-side PNG: each image labelled with backend and verdict, and under it the difference from the
    reference, amplified by one gain for the whole grid (written in the label) so magnitudes stay comparable."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    names = [r["backend"] for r in rows if r["backend"] in images]
    ref = images[reference]
    diffs = {n: np.abs(np.nan_to_num(images[n], nan=0.0) - ref).max(axis=2) for n in names}
    top = max((float(np.percentile(d, 99.5)) for d in diffs.values()), default=0.0)
    gain = float(np.clip(1.0 / top, 1.0, 255.0)) if top > 0 else 1.0
    h, w = ref.shape[:2]
    scale = max(1, -(-256 // w))  # small images are enlarged (nearest) so labels fit and pixels show
    tw, th, label = w * scale, h * scale, 34
    canvas = Image.new("RGB", (tw * len(names), (th + label) * 2), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    verdicts = {r["backend"]: r["verdict"] for r in rows}
    for i, n in enumerate(names):
        x = i * tw
        pic = Image.fromarray((np.nan_to_num(images[n], nan=0.0) * 255).round().astype("uint8"))
        canvas.paste(pic.resize((tw, th), Image.NEAREST), (x, label))
        color = {"pass": "darkgreen", "reference": "black"}.get(verdicts[n], "firebrick")
        draw.text((x + 4, 2), n, fill="black", font=font)
        draw.text((x + 4, 17), verdicts[n], fill=color, font=font)
        heat = (np.clip(diffs[n] * gain, 0, 1) * 255).round().astype("uint8")
        canvas.paste(Image.fromarray(heat).convert("RGB").resize((tw, th), Image.NEAREST), (x, th + 2 * label))
        # PIL's default font has no Δ or ×: keep labels ASCII
        draw.text((x + 4, th + label + 9), f"|diff| x{gain:.0f} (max {diffs[n].max() * 255:.0f}/255)",
                  fill="black", font=font)
    return canvas


def save(result: dict, folder) -> dict:
    """The grid PNG and the JSON report, under new names in `folder`."""
    from pathlib import Path

    folder = Path(folder)
    stem = f"compare-{result['seed']}"
    picture = grid(result["_images"], result["rows"], result["reference"])
    png = write_new(folder, stem, ".png", lambda p: picture.save(p, format="PNG"))
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["grid"] = str(png)
    js = write_new(folder, stem, ".json", lambda p: p.write_text(json.dumps(public, indent=2, default=str)))
    public["json"] = str(js)
    return public
