"""Everything sdcli draws: rich tables, progress bars, spinners and one-line summaries.

The modules underneath return data (or call back while they work); the commands in cli.py hand it
here. Only rich loads at import, so `sdcli --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import contextmanager

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdcli.errors import plural

# Piped output (a file, a log) gets 120 columns instead of rich's 80, so tables stay readable.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def error(text: str) -> None:
    err.print(f"[red]error:[/] {escape(text)}", soft_wrap=True)  # a path like out[1] is text, not markup


def warning(text: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)


def plain(value) -> str:
    """Text from outside (a package spec, a path, a message, a plug-in's name) as it is: in a table cell or a
    printed line rich would take `[cu13]` in `'flash-attn-4[cu13]>=4.0.0b36'` for markup and drop it."""
    return escape(str(value))


def interrupted(text: str) -> None:
    """Ctrl-C (or a time limit's SIGINT) cut a command short: what it kept, and how to go on."""
    say(f"interrupted: {text}")


def say(text: str) -> None:
    """A line on stderr as it is (e.g. an Interrupted run's, which says what it kept)."""
    err.print(text, markup=False, soft_wrap=True)


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


# ----- doctor -----------------------------------------------------------------------------------------


def serves_text(serves: dict | None) -> str:
    if not serves:
        return ""
    partial = {f: v for f, v in serves.items() if v["ok"] < v["of"]}
    if not partial:
        from sdcli.diagnosis import REFERENCE_SHAPES

        judged = "SD 1.x to 3.5, Flux.1 and the VAE" if set(serves) == set(REFERENCE_SHAPES) else ", ".join(serves)
        return f"serves every layer of {judged}"
    return "\n".join(f"{f}: {v['ok']}/{v['of']} layer shapes ({'; '.join(v['refused'])})" for f, v in partial.items())


STATUS_STYLE = {"usable": "green", "unsupported shape": "yellow", "not installed": "dim",
                "unsupported on this GPU": "yellow", "needs a GPU": "dim", "wrong version": "red",
                "broken install": "red", "failed the probe": "red"}


def print_doctor(result: dict) -> None:
    """`sdcli doctor`: the machine, its packages, every backend's verdict, the probe and the cached plans."""
    report, verdicts, probe = result["report"], result["verdicts"], result["probe"]
    s, t = report.get("system", {}), report.get("torch", {})
    machine = Table(title="Machine", show_header=False, title_justify="left")
    machine.add_column(style="bold")
    machine.add_column()
    machine.add_row("OS / Python", plain(f"{s.get('os')} / Python {s.get('python')}"))
    machine.add_row("CPU / RAM", plain(f"{s.get('cpu')} ({s.get('cpu_count')} threads) / {s.get('ram_gb')} GiB"))
    nvml = report.get("nvml", {})
    for g in report.get("gpus", []):
        machine.add_row(f"GPU {g['index']}", plain(
            f"{g['name']}, SM{str(g.get('compute_capability') or '?').replace('.', '')}, "
            f"{g.get('memory_total_gb')} GiB ({g.get('memory_free_gb')} free), {g.get('multiprocessors')} SMs"))
    if not report.get("gpus"):
        machine.add_row("GPU", "none found" + (f" (NVML: {plain(nvml['error'])})" if nvml.get("error") else ""))
    machine.add_row("Driver / CUDA",
                    plain(f"{nvml.get('driver') or '-'} / driver CUDA {nvml.get('cuda_driver') or '-'}"))
    machine.add_row("torch", plain(f"{t.get('version')}, CUDA {t.get('cuda') or '-'}, cuDNN {t.get('cudnn') or '-'}, "
                                   f"{'GPU usable' if t.get('cuda_available') else 'no GPU usable'}"))
    if report.get("gpus") and not t.get("cuda_available"):
        machine.add_row("[red]note[/]", "NVML sees a GPU but torch can't use it: install a CUDA build of torch "
                        "(pytorch.org), or update the driver" + (f" ({plain(t['error'])})" if t.get("error") else ""))
    dt = report.get("dtypes", {})
    if dt:
        machine.add_row(f"dtypes ({dt.get('device')})", ", ".join(
            f"{k} {'yes' if dt[k].get('supported') else 'no'}" for k in ("fp16", "bf16", "tf32", "fp8_e4m3") if k in dt))
    out.print(machine)

    pk = Table(title="Packages", title_justify="left")
    for col in ("package", "version", "state"):
        pk.add_column(col)
    for name, p in report.get("packages", {}).items():
        if p.get("import_ok"):
            state = "[green]ok[/]"
            if p.get("ops_ok") is False:
                state = f"[red]compiled ops don't load[/] (built for torch {plain(p.get('built_for_torch') or '?')})"
            if p.get("ops_import_error"):
                state = ("" if p.get("ops_ok") is not False else state + "; ") \
                    + f"[red]import xformers.ops fails[/]: {plain(p['ops_import_error'])}"
            if p.get("disk_cache") is not None:  # FlashAttention-4: off, it compiles again in every process
                state += f", compiled kernels kept on disk: {'yes' if p['disk_cache'] else '[yellow]no[/]'}"
        elif p.get("version") or p.get("import_ok") is False:
            state = f"[red]import fails[/]: {plain(p.get('error'))}"
        else:
            state = "[dim]not installed[/]"
        pk.add_row(plain(name), plain(p.get("version") or "-"), state)
    out.print(pk)

    bt = Table(title=plain(f"Attention backends on {verdicts['gpu']} ({verdicts['dtype']})"), title_justify="left",
               show_lines=True)
    for col in ("backend", "kind", "verdict", "why / which SD layers it serves", "fix"):
        bt.add_column(col, overflow="fold")
    for r in verdicts["backends"]:
        name = plain(r["backend"]) + (f"\n[dim]{plain(r['origin'])}[/]" if r["origin"] != "sdcli" else "")
        style = STATUS_STYLE.get(r["status"], "")
        bt.add_row(name, plain(r["kind"]), f"[{style}]{plain(r['status'])}[/]",
                   plain(r["reason"] or serves_text(r["serves"])), plain(r["fix"]))
    out.print(bt)

    if probe:
        from sdcli.diagnosis import CPU_PROBE_SEQ

        capped = "" if verdicts["device"].startswith("cuda") else f", sequences capped at {CPU_PROBE_SEQ} on the CPU"
        pt = Table(title=f"Probe: each backend at SD shapes, error against exact attention{capped}",
                   title_justify="left")
        for col in ("backend", "shape", "rel. error", "×round", "ms", "TFLOP/s"):
            pt.add_column(col, justify="left" if col in ("backend", "shape") else "right")
        for r in probe:
            if "error" in r:
                pt.add_row(plain(r["backend"]), plain(r["shape"]), f"[red]{plain(r['error'])}[/]", "", "", "")
                continue
            ratio = _fmt(r["ratio"], ".2f") if r["kind"] == "exact" else ""
            speed = (_fmt(r.get("ms"), ".2f"), _fmt(r.get("tflops"), ".2f")) if r["ok"] else ("", "")  # wrong: no speed
            pt.add_row(plain(r["backend"]), plain(r["shape"]), f"{r['rel_error']:.1e}",
                       ratio if r["ok"] else f"[red]{plain(r['why'])}[/]", *speed)
        out.print(pt)
    for plan in result["plans"]:
        out.print(plan_table(plan))
        out.print(f"  {plan['path']}", style="dim", soft_wrap=True, markup=False)
    for skipped in result["skipped_cache_files"]:
        out.print(f"Skipped in auto's plan cache: {skipped['path']}: {skipped['why']}", style="yellow", soft_wrap=True,
                  markup=False)


def probe_progress(enabled: bool):
    """A transient bar for `sdcli doctor --probe`: (the bar, to use as a context, and on_progress(text, total))."""
    from rich.progress import Progress

    bar = Progress(console=err, disable=not enabled, transient=True)
    task = bar.add_task("probing backends", total=None)
    return bar, lambda text, total: bar.update(task, description=text, total=total, advance=1)


def plan_table(plan: dict) -> Table:
    """A measured plan of `auto` (sdcli.tuning): per shape the choice, the runner-up and plain sdpa."""
    from sdcli.tuning import plan_rows

    k = plan["key"]
    t = Table(title=plain(f"Measured plan: {k['model']} {k['width']}x{k['height']}, batch {k['batch_size']}, "
                          f"{k['dtype']} on {k['machine']}"), title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("shape", "batch", "choice", "ms", "runner-up", "ms ", "sdpa ms", "failed the accuracy bound"):
        t.add_column(col, justify="right" if "ms" in col or col == "batch" else "left")
    for r in plan_rows(plan):
        t.add_row(plain(r["shape"]), str(r["batch"]), plain(r["choice"] or "-"), _fmt(r["ms"], ".3f"),
                  plain(r["runner_up"] or "-"), _fmt(r["runner_up_ms"], ".3f"), _fmt(r["sdpa_ms"], ".3f"),
                  plain(", ".join(r["refused"])))
    return t


# ----- generate -------------------------------------------------------------------------------------------


@contextmanager
def loading(quiet: bool):
    """A spinner that says what is slow while a run is prepared (loading, measuring auto's plan, compiling):
    `with loading(quiet) as on_progress:`, on_progress(text) or None."""
    if quiet or not err.is_terminal:
        yield None
        return
    with err.status("loading the model", spinner="dots") as spinner:
        yield lambda text: spinner.update(f"measuring auto's plan: {text}")


@contextmanager
def making(images: int, steps: int, quiet: bool):
    """Bars while images are made: `with making(images, steps, quiet) as (on_step, on_image):`, for
    pipeline.generate; on_image warns about an image that came out bad. The bars are gone when the block ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, disable=quiet) as bar:
        done = bar.add_task("images", total=images)
        step = bar.add_task("steps", total=steps)

        def on_step(_step, _latents):
            if bar.tasks[step].completed >= steps:
                bar.reset(step)
            bar.advance(step)

        def on_image(result):
            bar.advance(done)
            if result.problem:
                warning(f"{result.path.name}: {result.problem}")

        try:
            yield on_step, on_image
        finally:
            bar.stop()


def print_generate(summary: dict, json_out: bool, quiet: bool, verbose: bool) -> None:
    """A generate run's summary (one process's, or every rank's) as text or JSON."""
    if json_out:
        emit_json(summary)
    elif not quiet:
        n, ranks, skipped = len(summary["images"]), summary.get("world_size", 1), len(summary.get("skipped", []))
        peak = summary["peak_gpu_memory_gb"]
        what = ", ".join(str(x) for x in (summary["model"], summary["device"], summary["dtype"]) if x)
        out.print(f"Wrote {n} image{'s' if n != 1 else ''} to {summary['output_dir']}"
                  + (f" with {ranks} processes" if ranks > 1 else "") + (f" ({what})" if what else "")
                  + (f": {summary['seconds_per_image']} s/image, {summary['images_per_second']} images/s"
                     + (" in all" if ranks > 1 else "") if n else "")
                  + (f", peak GPU memory {peak} GiB" if peak is not None else "")
                  + (f"; {skipped} were already there (--resume)" if skipped else ""),
                  soft_wrap=True, markup=False)
        if summary.get("manifest"):
            out.print(f"Manifest: {summary['manifest']}", soft_wrap=True, markup=False)
        if verbose and ranks > 1:
            for r in summary["ranks"]:
                out.print(f"  rank {r['rank']} ({r['host']}, {r['device'] or 'no model loaded'}): {r['images']} "
                          f"image{'s' if r['images'] != 1 else ''} in {r['seconds']:.1f} s"
                          + (f", {len(r['skipped'])} already there" if r["skipped"] else "")
                          + (f"; {r['error']}" if r["error"] else ""), soft_wrap=True, markup=False)
        if (summary.get("speed") or {}).get("note"):
            warning(summary["speed"]["note"])
        if summary["attention"]:  # None when rank 0 had nothing left to make
            print_attention(summary["attention"], verbose, "rank 0" if ranks > 1 else "")
        if summary.get("tuning"):
            plan = summary["tuning"]
            where = f"not saved to {plan['path']} ({plan['not_saved']})" if plan.get("not_saved") else plan["path"]
            out.print(f"Auto's plan: {'cached' if plan['cached'] else 'measured now'}, {where} (--retune to measure "
                      "again)", soft_wrap=True, markup=False)
            if verbose:
                out.print(plan_table(plan))


def print_attention(att: dict, verbose: bool, who: str = "") -> None:
    served = ", ".join(f"{b} {plural(n, 'call')}" for b, n in att["served"].items())
    out.print(f"Attention ({att['requested']}{', ' + who if who else ''}): {served}", soft_wrap=True, markup=False)
    folded: dict[tuple, list[str]] = {}  # layers that fell back the same way, for the same reason: one line
    for f in att["fallbacks"]:
        folded.setdefault((f["backend"], f["instead_of"], f["why"]), []).append(f["layer"])
    for (backend, instead_of, why), layers in folded.items():
        parts = ", ".join(dict.fromkeys(layer.split(".")[0] for layer in layers))
        which = layers[0] if len(layers) == 1 else f"{plural(len(layers), 'layer')} of the {parts} (--json lists each)"
        out.print(f"  fallback: {which} → {backend} ({instead_of}: {why})", soft_wrap=True, markup=False)
    not_routed = Counter(why for layer in att.get("not_routed", []) for why in layer["why"])
    for why, layers in not_routed.items():
        out.print(f"  not routed: {plural(layers, 'layer')}: {why}", soft_wrap=True, markup=False)
    if not verbose:
        return
    t = Table(title="Attention plan: which kernel served which layers (\\[kernel]: what torch's SDPA picked)",
              title_justify="left")
    for col in ("part", "kind", "heads×dim", "dtype", "layers", "sequences (q, kv)", "served (calls)", "processors",
                "passed over"):
        t.add_column(col, overflow="fold")
    for g in att["groups"]:
        calls = ", ".join(f"{b}: {n}" + (f" [{g['kernels'][b].replace('_attention', '')}]" if b in g["kernels"] else "")
                          for b, n in g["calls"].items())
        processors = ", ".join(g["processors"]) + (f" ({g['not_reached']} not reached)" if g["not_reached"] else "")
        t.add_row(plain(g["part"]), g["kind"], f"{g['heads'] or '?'}×{g['head_dim'] or '?'}", g["dtype"],
                  str(g["layers"]), " ".join(f"{q}·{kv}" for q, kv in g["seqs"]), plain(calls), plain(processors),
                  plain("; ".join(f"{b}: {r}" for b, r in g["refused"].items())))
    out.print(t)


class GenerateView:
    """How `sdcli generate` shows one process's run, or its share of a multi-rank run: a spinner while loading,
    bars while making images, then the summary or JSON; a rank's errors, warnings and interruptions as they
    happen. It only draws: what to do is the caller's."""

    def __init__(self, json_out: bool, quiet: bool, verbose: bool):
        self.json_out, self.quiet, self.verbose = json_out, quiet, verbose

    def loading(self, quiet: bool | None = None):
        return loading(self.quiet if quiet is None else quiet)

    def making(self, images: int, steps: int, quiet: bool | None = None):
        return making(images, steps, (self.quiet if quiet is None else quiet) or not err.is_terminal)

    def show(self, summary: dict, quiet: bool | None = None) -> None:
        print_generate(summary, self.json_out, self.quiet if quiet is None else quiet, self.verbose)

    interrupted = staticmethod(say)
    error = staticmethod(error)
    warning = staticmethod(warning)


# ----- compare ------------------------------------------------------------------------------------------


def status(text: str, quiet: bool):
    """A spinner on a terminal (else nothing): (context, on_progress(text))."""
    from contextlib import nullcontext

    if quiet or not err.is_terminal:
        return nullcontext(), None
    spinner = err.status(text, spinner="dots")
    return spinner, lambda update: spinner.update(f"{text}: {update}")


def print_compare(result: dict) -> None:
    t = Table(title=plain(f"{result['model']}, seed {result['seed']}, {result['steps']} steps, {result['dtype']} on "
                          f"{result['gpu']}, against {result['reference']}"), title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("backend", "verdict", "kernel err", "×round", "step err", "PSNR", "SSIM", "max|Δ|", "s", "GiB"):
        t.add_column(col, justify="left" if col in ("backend", "verdict") else "right")
    for r in result["rows"]:
        k = r.get("kernel") or {}
        style = {"pass": "green", "reference": "bold", "n/a": "yellow", "not judged": "yellow"}.get(r["verdict"], "red")
        kind = "" if r["verdict"] == "reference" else f" [dim]{r['kind'][:5]}[/]"
        psnr = "∞" if r.get("identical") else _fmt(r.get("psnr_db"), ".1f")
        t.add_row(plain(r["backend"]), f"[{style}]{r['verdict']}[/]{kind}", _fmt(k.get("max_rel_error"), ".1e"),
                  _fmt(k.get("max_ratio"), ".2f"), _fmt(r.get("step_rel_error"), ".1e"), psnr,
                  _fmt(r.get("ssim"), ".4f"), _fmt(r.get("max_abs_diff"), ".0f"), _fmt(r.get("seconds"), ".2f"),
                  _fmt(r.get("peak_memory_gb"), ".2f"))
    out.print(t)
    for r in result["rows"]:
        if r["verdict"] in ("n/a", "not judged"):
            out.print(f"[yellow]{plain(r['backend'])} {r['verdict']}[/]: {plain(r['why'])}", soft_wrap=True)
        elif r["verdict"] not in ("pass", "reference"):
            out.print(f"[red]{plain(r['backend'])} {r['verdict']}[/]: {plain(r['why'])}", soft_wrap=True)
        elif r.get("fallback_layers"):
            out.print(f"{r['backend']}: {r['fallback_layers']} of {plural(r['layers'], 'layer')} served by "
                      f"{result['reference']} (the backend can't take them)", soft_wrap=True, markup=False)
    t0 = result["thresholds"]
    out.print(f"kernel err: the worst call's relative error against exact attention (every layer's captured inputs, "
              f"and sampled ones per layer shape); ×round: the worst call's error over the rounding of its exact "
              f"result to {result['dtype']} (exact kernels pass at ≤ {t0['exact_tol']:g}× in every call; quantized "
              f"ones at a relative error ≤ {t0['quantized_tol']:g}). step err: latent after step 1. "
              "max|Δ| in 0-255.",
              soft_wrap=True, style="dim")
    out.print(f"grid: {result['grid']}\nreport: {result['json']}", soft_wrap=True, markup=False)


# ----- bench --------------------------------------------------------------------------------------------


def bench_progress(quiet: bool):
    """A bar for `sdcli bench`: (the bar, to use as a context, and on_progress(text, advance))."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, disable=quiet or not err.is_terminal, transient=True)
    task = bar.add_task("loading the model", total=None)
    return bar, lambda text, advance=0: bar.update(task, description=text, advance=advance)


def bench_kept(result: dict) -> str:
    """What an interrupted bench kept, in words."""
    from sdcli.benchmark import kept

    return kept(result)


def print_bench(r: dict) -> None:
    from sdcli.backends import Shape
    from sdcli.benchmark import guidance_label

    t = Table(title=plain(f"{r['model']} {r['width']}x{r['height']}, {r['steps']} steps, {guidance_label(r)}, "
                          f"{r['dtype']} on {r['gpu']}: images/s (whole pipeline, median of {r['repeats']})"),
              title_justify="left",
              box=box.SIMPLE_HEAD)
    t.add_column("configuration")
    for b in r["batch_sizes"]:
        t.add_column(f"b={b}", justify="right")
    for col in ("best", "× diffusers", "× same options", "s/img b=1", "max batch", "peak GiB"):
        t.add_column(col, justify="right")
    for c in r["configs"]:
        by_batch = {p["batch"]: p for p in c["points"]}
        cells = []
        for b in r["batch_sizes"]:
            p = by_batch.get(b)
            cells.append("-" if p is None else "OOM" if p["oom"] else f"{p['images_per_s']:.3f}")
        best = c["best"]
        peak = by_batch.get(best["batch"], {}).get("peak_gb") if best else None
        t.add_row(plain(c["name"]), *cells, f"{best['images_per_s']:.3f} @{best['batch']}" if best else "-",
                  _fmt(c.get("speedup_vs_diffusers"), ".2f"),
                  _fmt(c.get("speedup_vs_baseline"), ".2f") if c["options"] else "",
                  _fmt(c.get("s_per_image_batch1"), ".3f"),
                  str(c["largest_batch"]) if c.get("largest_batch") is not None else "-", _fmt(peak, ".2f"))
    out.print(t)
    sp = r["speed"]
    on = lambda flag: "on" if flag else "off"  # noqa: E731
    out.print(f"Every row: TF32 {on(sp['tf32'])}, cuDNN autotuner {on(sp['cudnn_benchmark'])}"
              + (f"; compiled rows in {sp['compile_mode']} mode" if sp["compile_mode"] else ""), soft_wrap=True)
    if sp.get("note"):
        out.print(f"[yellow]note:[/] {plain(sp['note'])}", soft_wrap=True)
    for s in r["summary"]:
        if s["speedup"]:
            out.print(f"{s['what']}: {s['row']} is ×{s['speedup']:.2f} {s['against']}", soft_wrap=True, markup=False)
    if r.get("attention"):
        a = Table(title="Attention kernels alone at the model's shapes (batch = 1 image, 2 with CFG): ms, TFLOP/s",
                  title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("shape", "batch", "fastest first (✗ = outside its accuracy bound)"):
            a.add_column(col, overflow="fold")
        for e in r["attention"]:
            rows = sorted(e["measurements"], key=lambda m: m.get("ms", float("inf")))
            cells = [f"{m['backend']} {m['ms']:.3f} ({m['tflops']:.2f})" + ("" if m["ok"] else " ✗")
                     if "ms" in m else f"{m['backend']} failed" for m in rows]
            shape = e["shape"]
            a.add_row(str(Shape(**shape)), str(shape.get("batch")), plain(", ".join(cells)))
        out.print(a)
    out.print(f"Timing: {r['timing']}.", style="dim")
    out.print(f"plot: {r['plot'] or '- (nothing measured to plot)'}\njson: {r['json'] or '-'}", soft_wrap=True,
              markup=False)
