"""The `sdcli` command: thin typer commands over the Python API.

Only typer and rich load at start-up; torch and diffusers load inside the commands that need them,
so `sdcli --help` and completions stay fast.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import warnings

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from sdcli import SdcliError, __version__, first_line

# Piped output (a file, a log) gets 120 columns instead of rich's 80, so tables stay readable.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)
# flex warns on every eager call; `sdcli doctor` already labels it "slow unless compiled"
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


class Group(TyperGroup):
    """Bad input is one line on stderr and a non-zero exit, never a traceback (SDCLI_DEBUG=1 shows it)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits and usage errors
            raise
        except SdcliError as exc:
            err.print(f"[red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except Exception as exc:
            if os.environ.get("SDCLI_DEBUG"):
                raise
            err.print(f"[red]error:[/] {type(exc).__name__}: {exc}  (SDCLI_DEBUG=1 shows the traceback)", soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=Group,
    help="Stable Diffusion with the fastest attention kernel that is correct on this GPU, and the evidence.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def version_callback(value: bool) -> None:
    if value:
        out.print(f"sdcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """sdcli: doctor, generate, compare, bench."""


# ----- doctor -----------------------------------------------------------------------------------------


def serves_text(serves: dict | None) -> str:
    if not serves:
        return ""
    partial = {f: v for f, v in serves.items() if v["ok"] < v["of"]}
    if not partial:
        return "serves every SD 1.x/2.x/XL and VAE layer"
    return "\n".join(f"{f}: {v['ok']}/{v['of']} layer shapes ({'; '.join(v['refused'])})" for f, v in partial.items())


STATUS_STYLE = {"usable": "green", "unsupported shape": "yellow", "not installed": "dim",
                "unsupported on this GPU": "yellow", "wrong version": "red", "broken install": "red"}


def print_doctor(report: dict, verdicts: dict, probe: list | None) -> None:
    s, t = report.get("system", {}), report.get("torch", {})
    machine = Table(title="Machine", show_header=False, title_justify="left")
    machine.add_column(style="bold")
    machine.add_column()
    machine.add_row("OS / Python", f"{s.get('os')} / Python {s.get('python')}")
    machine.add_row("CPU / RAM", f"{s.get('cpu')} ({s.get('cpu_count')} threads) / {s.get('ram_gb')} GiB")
    nvml = report.get("nvml", {})
    for g in report.get("gpus", []):
        machine.add_row(f"GPU {g['index']}", f"{g['name']}, SM{str(g.get('compute_capability') or '?').replace('.', '')}, "
                        f"{g.get('memory_total_gb')} GiB ({g.get('memory_free_gb')} free), {g.get('multiprocessors')} SMs")
    if not report.get("gpus"):
        machine.add_row("GPU", "none found" + (f" (NVML: {nvml['error']})" if nvml.get("error") else ""))
    machine.add_row("Driver / CUDA", f"{nvml.get('driver') or '-'} / driver CUDA {nvml.get('cuda_driver') or '-'}")
    machine.add_row("torch", f"{t.get('version')}, CUDA {t.get('cuda') or '-'}, cuDNN {t.get('cudnn') or '-'}, "
                    f"{'GPU usable' if t.get('cuda_available') else 'no GPU usable'}")
    if report.get("gpus") and not t.get("cuda_available"):
        machine.add_row("[red]note[/]", "NVML sees a GPU but torch can't use it: install a CUDA build of torch "
                        "(pytorch.org), or update the driver" + (f" ({t['error']})" if t.get("error") else ""))
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
                state = f"[red]compiled ops don't load[/] (built for torch {p.get('built_for_torch') or '?'})"
        elif p.get("version") or p.get("import_ok") is False:
            state = f"[red]import fails[/]: {p.get('error')}"
        else:
            state = "[dim]not installed[/]"
        pk.add_row(name, p.get("version") or "-", state)
    out.print(pk)

    bt = Table(title=f"Attention backends on {verdicts['gpu']} ({verdicts['dtype']})", title_justify="left",
               show_lines=True)
    for col in ("backend", "kind", "verdict", "why / which SD layers it serves", "fix"):
        bt.add_column(col, overflow="fold")
    for r in verdicts["backends"]:
        name = r["backend"] + (f"\n[dim]{r['origin']}[/]" if r["origin"] != "sdcli" else "")
        style = STATUS_STYLE.get(r["status"], "")
        bt.add_row(name, r["kind"], f"[{style}]{r['status']}[/]", r["reason"] or serves_text(r["serves"]), r["fix"])
    out.print(bt)

    if probe:
        from sdcli.doctor import CPU_PROBE_SEQ

        capped = "" if verdicts["device"].startswith("cuda") else f", sequences capped at {CPU_PROBE_SEQ} on the CPU"
        pt = Table(title=f"Probe: each backend at SD shapes, error against fp32 math{capped}", title_justify="left")
        for col in ("backend", "shape", "rel. error", "ms", "TFLOP/s"):
            pt.add_column(col, justify="right" if col in ("rel. error", "ms", "TFLOP/s") else "left")
        for r in probe:
            if r["ok"]:
                pt.add_row(r["backend"], r["shape"], f"{r['rel_error']:.1e}", f"{r['ms']:.2f}", f"{r['tflops']:.2f}")
            else:
                pt.add_row(r["backend"], r["shape"], f"[red]{r.get('error') or 'non-finite output'}[/]", "", "")
        out.print(pt)


@app.command()
def doctor(
    json_out: JsonOpt = False,
    report: Annotated[Optional[Path], typer.Option(
        "--report", help="Judge a saved `sdcli doctor --json` (e.g. from another machine) instead of this one.")] = None,
    probe: Annotated[bool, typer.Option(
        "--probe", help="Run every usable backend once at SD attention shapes: error vs fp32 and time.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Judge for this device (cuda:N or cpu).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Judge shapes in this dtype: fp16, bf16 or fp32.")] = None,
) -> None:
    """What this machine can run: GPU, packages, and a verdict with a fix for every attention backend."""
    from rich.progress import Progress

    from sdcli import api, tuning

    with Progress(console=err, disable=json_out or not probe, transient=True) as bar:
        task = bar.add_task("probing backends", total=None)
        result = api.doctor(device=device, dtype=dtype, probe=probe, report=report,
                            on_progress=lambda text, total: bar.update(task, description=text, total=total, advance=1))
    if json_out:
        emit_json(result)
    else:
        print_doctor(result["report"], result["verdicts"], result["probe"])
        for plan in result["plans"]:
            out.print(plan_table(plan, tuning.summary(plan)))
            out.print(f"  {plan['path']}", style="dim", soft_wrap=True)


def main() -> None:
    app(prog_name="sdcli")  # also under `python -m sdcli`, so completion and usage say `sdcli`


# ----- generate -----------------------------------------------------------------------------------------

BackendOpt = Annotated[str, typer.Option(
    "--backend", "-b", help="auto, or an attention backend (see `sdcli doctor`). A named backend that can't serve "
                            "a layer is an error unless --fallback.")]
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="tiny (built in, offline, images are noise), a Hub id, a diffusers folder, or a "
                          ".safetensors/.ckpt file.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on SM80+ GPUs, fp16 on older ones, fp32 on CPU), fp16, "
                                            "bf16 or fp32.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
FallbackOpt = Annotated[bool, typer.Option(help="Let other backends serve the layers a named --backend can't.")]
QuantizedOpt = Annotated[bool, typer.Option(
    "--quantized", help="Let --backend auto use quantized kernels (SageAttention): faster, results move more.")]
NegativeOpt = Annotated[Optional[str], typer.Option("--negative-prompt", "-n", help="What to keep out of the image.")]
StepsOpt = Annotated[int, typer.Option(help="Denoising steps.")]
GuidanceOpt = Annotated[float, typer.Option(help="Classifier-free guidance scale (CFG doubles the UNet's batch).")]
WidthOpt = Annotated[Optional[int], typer.Option(help="Multiple of 8; default: the model's native size.")]
HeightOpt = Annotated[Optional[int], typer.Option(help="Multiple of 8; default: the model's native size.")]
SchedulerOpt = Annotated[str, typer.Option(
    help="default (the model's own), euler, euler-a, dpm++2m, dpm++2m-karras, ddim, pndm, unipc, heun.")]
VaeDtypeOpt = Annotated[str, typer.Option(help="auto (fp32 when fp16 would overflow), fp16, bf16 or fp32.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, summary or tables.")]
TuneOpt = Annotated[bool, typer.Option(
    help="--backend auto measures the fastest backend per layer shape on first use and caches it; --no-tune "
         "uses the documented order instead.")]
RetuneOpt = Annotated[bool, typer.Option("--retune", help="Measure auto's plan again, ignoring the cached one.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (slow first call).")]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last", help="UNet and VAE in channels-last memory format.")]
FuseQkvOpt = Annotated[bool, typer.Option("--fuse-qkv", help="diffusers' fused q/k/v projections.")]


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="What to draw.")] = None,
    prompts_file: Annotated[Optional[Path], typer.Option(help="One prompt per line (instead of PROMPT).")] = None,
    negative_prompt: NegativeOpt = None,
    model: ModelOpt = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    backend: BackendOpt = "auto",
    fallback: FallbackOpt = False,
    quantized: QuantizedOpt = False,
    tune: TuneOpt = True,
    retune: RetuneOpt = False,
    compile_: CompileOpt = False,
    channels_last: ChannelsLastOpt = False,
    fuse_qkv: FuseQkvOpt = False,
    steps: StepsOpt = 30,
    guidance: GuidanceOpt = 7.5,
    width: WidthOpt = None,
    height: HeightOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Image n of the run uses seed+n; default: random.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per pipeline call.")] = 1,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    scheduler: SchedulerOpt = "default",
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    device: DeviceOpt = "auto",
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where images go; never overwritten.")] = Path("outputs"),
    resume: Annotated[bool, typer.Option(
        "--resume", help="Finish an interrupted run: skip items whose image is already in --output-dir (complete, "
                         "same item and seed), make the rest. Needs the first run's --seed and settings.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show which kernel served which layers.")] = False,
) -> None:
    """Text to image, with attention routed per layer to the chosen backend. Images keep their recipe.

    Under torchrun or `accelerate launch`, each process makes its share and rank 0 writes manifest.jsonl."""
    from sdcli import distributed, pipeline

    if prompt and prompts_file:
        raise SdcliError("give a PROMPT or --prompts-file, not both")
    prompts = pipeline.read_prompts_file(prompts_file) if prompts_file else [prompt] if prompt else []
    settings = pipeline.Settings(
        prompts=prompts, negative_prompt=negative_prompt, model=model, steps=steps, guidance=guidance,
        width=width, height=height, seed=seed, batch_size=batch_size, num_images=num_images, scheduler=scheduler,
        dtype=dtype, vae_dtype=vae_dtype, device=device, backend=backend, fallback=fallback, quantized=quantized,
        tune=tune, retune=retune, compile=compile_, channels_last=channels_last, fuse_qkv=fuse_qkv,
        output_dir=output_dir)
    if resume and seed is None:
        raise SdcliError("--resume needs the --seed of the run it finishes (without one, seeds are random and "
                         "no image on disk can match)")
    settings.validate()  # fail on bad input before the slow imports
    ranks = distributed.detect()
    if ranks.launched or resume:
        generate_share(settings, ranks, resume, json_out, quiet, verbose)
        return
    run = prepare_with_status(settings, quiet)
    run_with_progress(run, pipeline.work_items(settings), quiet=quiet or not err.is_terminal)
    report_run(run, json_out, quiet, verbose)


def prepare_with_status(settings, quiet: bool, report: dict | None = None):
    """pipeline.prepare with a spinner that says what is slow: loading, measuring auto's plan, compiling."""
    from sdcli import pipeline

    if quiet or not err.is_terminal:
        return pipeline.prepare(settings, report)
    with err.status("loading the model", spinner="dots") as status:
        return pipeline.prepare(settings, report,
                                on_progress=lambda text: status.update(f"measuring auto's plan: {text}"))


def generate_share(settings, ranks, resume: bool, json_out: bool, quiet: bool, verbose: bool) -> None:
    """This process's share of the work (under a launcher, or with --resume), recorded line by line; then
    every rank waits for the others, and rank 0 writes the manifest and reports. Other ranks print only errors.
    A rank that fails says so at once, then waits too, so the others finish their shares."""
    from sdcli import distributed, hardware, images, pipeline

    folder = settings.output_dir
    items = pipeline.work_items(settings)
    mine = distributed.share(items, settings.batch_size, ranks)
    several = ranks.world_size > 1
    speaks = ranks.main and not quiet
    run, done, error, code = None, {}, None, 0
    try:
        with distributed.open_part(folder, ranks.rank, resume) as part:
            if resume:
                done = distributed.finished(mine, settings)
            if len(done) < len(mine):  # else this rank has nothing left to make: no model to load
                settings.device = distributed.device_for(ranks, settings.device)
                gpu = int(settings.device[5:]) if (settings.device or "").startswith("cuda:") else None
                run = prepare_with_status(settings, not speaks, hardware.probe(only_gpu=gpu) if several else None)
                run_with_progress(run, mine, quiet=not speaks or not err.is_terminal, skip=set(done),
                                  on_saved=lambda result: distributed.record(
                                      part, result, ranks.rank, images.attention_summary(run.router)),
                                  rank=ranks.rank if several else None)
    except typer.Exit as exc:  # interrupted: run_with_progress said so
        error, code = "interrupted", exc.exit_code
    except KeyboardInterrupt:
        error, code = "interrupted", 130
        err.print(f"{'rank %d: ' % ranks.rank if several else ''}interrupted", soft_wrap=True)
    except Exception as exc:
        if os.environ.get("SDCLI_DEBUG"):
            import traceback

            traceback.print_exc()
        error = str(exc) if isinstance(exc, SdcliError) else f"{type(exc).__name__}: {exc}"
        if several and not error.startswith(f"rank {ranks.rank}: "):
            error = f"rank {ranks.rank}: {error}"
        code = getattr(exc, "exit_code", 1)
        err.print(f"[red]error:[/] {error}", soft_wrap=True)
    outcome = {"rank": ranks.rank, "local_rank": ranks.local_rank, "host": distributed.host(),
               "device": run.device if run else None, "error": error, "exit_code": code,
               "images": [r.to_json() for r in run.images] if run else [], "skipped": sorted(done),
               "seconds": round(run.seconds, 3) if run else 0.0,
               "load_seconds": round(run.load_seconds, 3) if run else 0.0,
               "peak_gpu_memory_gb": run.peak_memory_gb if run else None,
               "served": dict(run.router.served()) if run and run.router else {}}
    outcomes = distributed.gather(outcome, ranks)
    try:
        if ranks.main:
            manifest = distributed.write_manifest(folder, distributed.merge(items, folder, ranks.world_size, resume))
            if outcomes is None and several:
                err.print("[yellow]warning:[/] the ranks can't wait for each other here (no MASTER_ADDR/MASTER_PORT "
                          "from a launcher, or no torch.distributed), so the manifest lists only what was finished "
                          "by now; run the same command with --resume to complete it", soft_wrap=True)
            report_share(run, settings, outcomes or [outcome], manifest, json_out, quiet or code != 0, verbose)
    except SdcliError as exc:  # said here, not after finish(): by then the launcher may be stopping this process
        err.print(f"[red]error:[/] {exc}", soft_wrap=True)
        code = code or exc.exit_code
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        distributed.finish(ranks)
    if code:
        raise typer.Exit(code)


def report_share(run, settings, outcomes: list[dict], manifest: Path, json_out: bool, quiet: bool,
                 verbose: bool) -> None:
    """Rank 0's report: every rank's images in one summary, the manifest, and which ranks failed. Rank 0's
    exit status stays its own, so that the launcher names the rank that failed as the root cause."""
    from sdcli import pipeline

    images = sorted((image for o in outcomes for image in o["images"]), key=lambda image: image["item"])
    seconds = max(o["seconds"] for o in outcomes)  # ranks run side by side
    summary = run.summary() if run else {"settings": pipeline.settings_json(settings), "attention": None,
                                         "output_dir": str(settings.output_dir), "model": None, "dtype": None}
    peaks = [o["peak_gpu_memory_gb"] for o in outcomes if o["peak_gpu_memory_gb"] is not None]
    summary.update({
        "images": images, "problems": [image for image in images if image["problem"]],
        "skipped": sorted(i for o in outcomes for i in o["skipped"]),
        "device": ", ".join(dict.fromkeys(o["device"] for o in outcomes if o["device"])) or None,
        "seconds": round(seconds, 3),
        "seconds_per_image": round(sum(o["seconds"] for o in outcomes) / len(images), 4) if images else None,
        "images_per_second": round(len(images) / seconds, 4) if images and seconds else None,
        "peak_gpu_memory_gb": max(peaks) if peaks else None,
        "manifest": str(manifest), "world_size": len(outcomes),
        "ranks": [{k: v for k, v in o.items() if k != "images"} | {"images": len(o["images"])} for o in outcomes],
    })
    failed = [o for o in outcomes if o["error"] and o["rank"] != 0]
    try:
        report_run(run, json_out, quiet, verbose, summary)
    except BadImages:
        if not failed:
            raise
    if failed:  # each failed rank said what and where, and exits non-zero; this is the sum of it
        n = len(images) + len(summary["skipped"])
        err.print(f"[red]error:[/] {len(failed)} of {len(outcomes)} ranks failed "
                  f"({'; '.join(o['error'] for o in failed)}); {n} finished image{'s' if n != 1 else ''} listed in "
                  f"{manifest}; run the same command with --resume to make the rest", soft_wrap=True)


def run_with_progress(run, items, quiet: bool, skip=frozenset(), on_saved=None,
                      rank: int | None = None) -> None:
    """Generate with a progress bar; Ctrl-C or an error keeps what finished and says where it is.
    `skip`: items already on disk (--resume); on_saved(result) runs after each image is written; `rank`
    names this process in messages when there are several."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sdcli import pipeline

    todo = [item for item in items if item.index not in skip]
    who = "" if rank is None else f"rank {rank}: "
    steps_per_batch = run.settings.steps
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, disable=quiet) as bar:
        images = bar.add_task("images", total=len(todo))
        steps = bar.add_task("steps", total=steps_per_batch)

        def on_step(_step, _latents):
            if bar.tasks[steps].completed >= steps_per_batch:
                bar.reset(steps)
            bar.advance(steps)

        def on_image(result):
            bar.advance(images)
            if on_saved:
                on_saved(result)
            if result.problem:
                err.print(f"[yellow]warning:[/] {result.path.name}: {result.problem}", soft_wrap=True)

        try:
            pipeline.generate(run, items, on_step=on_step, on_image=on_image, skip=skip)
        except KeyboardInterrupt:
            bar.stop()
            err.print(f"{who}interrupted: {kept(run)}", soft_wrap=True)
            raise typer.Exit(130) from None
        except SdcliError:
            raise
        except Exception as exc:
            if os.environ.get("SDCLI_DEBUG"):
                raise
            bar.stop()
            saved = {r.item.index for r in run.images}
            failed = next((item for item in todo if item.index not in saved), None)  # first of the batch that broke
            if failed and rank is None:
                where = f" in image {len(saved) + 1} (item {failed.index}, seed {failed.seed})"
            else:  # "image k" means little in one share of the work
                where = f" in item {failed.index} (seed {failed.seed})" if failed else ""
            raise RunFailed(f"{who}{type(exc).__name__}{where}: {first_line(exc)}"
                            f"; {kept(run)}") from None


def kept(run) -> str:
    n = len(run.images)
    return f"{n} finished image{'s' if n != 1 else ''} kept in {run.settings.output_dir}" if n else "no image was finished"


def report_run(run, json_out: bool, quiet: bool, verbose: bool, summary: dict | None = None) -> None:
    """The summary (default: this process's run; report_share passes every rank's) as text or JSON."""
    summary = summary or run.summary()
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
                  soft_wrap=True)
        if summary.get("manifest"):
            out.print(f"Manifest: {summary['manifest']}", soft_wrap=True)
        if verbose and ranks > 1:
            for r in summary["ranks"]:
                out.print(f"  rank {r['rank']} ({r['host']}, {r['device'] or 'no model loaded'}): {r['images']} "
                          f"image{'s' if r['images'] != 1 else ''} in {r['seconds']:.1f} s"
                          + (f", {len(r['skipped'])} already there" if r["skipped"] else "")
                          + (f"; {r['error']}" if r["error"] else ""), soft_wrap=True)
        if summary["attention"]:  # None when rank 0 had nothing left to make
            print_attention(summary["attention"], verbose, "rank 0" if ranks > 1 else "")
        if summary.get("tuning"):
            print_tuning(summary["tuning"], verbose)
    if summary["problems"]:
        raise BadImages(summary["problems"])


class RunFailed(SdcliError):
    exit_code = 1


class BadImages(SdcliError):
    exit_code = 3

    def __init__(self, problems):
        super().__init__(f"{len(problems)} image(s) came out NaN or black (kept, see above): {problems[0]['problem']}")


def print_tuning(plan: dict, verbose: bool) -> None:
    from sdcli import tuning

    where = "cached" if plan["cached"] else "measured now"
    out.print(f"Auto's plan: {where}, {plan['path']} (--retune to measure again)", soft_wrap=True)
    if verbose:
        out.print(plan_table(plan, tuning.summary(plan)))


def plan_table(plan: dict, rows: list[dict]) -> Table:
    k = plan["key"]
    t = Table(title=f"Measured plan: {k['model']} {k['width']}x{k['height']}, batch {k['batch_size']}, {k['dtype']} on "
                    f"{k['machine']}", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("shape", "batch", "choice", "ms", "runner-up", "ms ", "sdpa ms", "failed the accuracy bound"):
        t.add_column(col, justify="right" if "ms" in col or col == "batch" else "left")
    for r in rows:
        t.add_row(r["shape"], str(r["batch"]), r["choice"] or "-", _fmt(r["ms"], ".3f"), r["runner_up"] or "-",
                  _fmt(r["runner_up_ms"], ".3f"), _fmt(r["sdpa_ms"], ".3f"), ", ".join(r["refused"]))
    return t


def print_attention(att: dict, verbose: bool, who: str = "") -> None:
    served = ", ".join(f"{b} {n} calls" for b, n in att["served"].items())
    out.print(f"Attention ({att['requested']}{', ' + who if who else ''}): {served}", soft_wrap=True)
    for f in att["fallbacks"]:
        out.print(f"  fallback: {f['layer']} → {f['backend']} ({f['instead_of']}: {f['why']})", soft_wrap=True)
    if not verbose:
        return
    t = Table(title="Attention plan: which kernel served which layers (\\[kernel]: what torch's SDPA picked)",
              title_justify="left")
    for col in ("part", "kind", "heads×dim", "dtype", "layers", "sequences (q, kv)", "served (calls)", "passed over"):
        t.add_column(col, overflow="fold")
    for g in att["groups"]:
        calls = ", ".join(f"{b}: {n}" + (f" \\[{g['kernels'][b].replace('_attention', '')}]" if b in g["kernels"] else "")
                          for b, n in g["calls"].items())
        t.add_row(g["part"], g["kind"], f"{g['heads']}×{g['head_dim']}", g["dtype"], str(g["layers"]),
                  " ".join(f"{q}·{kv}" for q, kv in g["seqs"]), calls,
                  "; ".join(f"{b}: {r}" for b, r in g["refused"].items()))
    out.print(t)


# ----- compare ------------------------------------------------------------------------------------------


class CompareFailed(SdcliError):
    exit_code = 1


@app.command()
def compare(
    seed: Annotated[int, typer.Option(help="The seed every backend renders from.")] = 42,
    prompt: Annotated[str, typer.Option(help="What to draw.")] = "a photo of an astronaut riding a horse on mars",
    negative_prompt: NegativeOpt = None,
    model: ModelOpt = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    backends_: Annotated[Optional[str], typer.Option(
        "--backends", help="Comma-separated backends to compare; default: every one usable here.")] = None,
    reference: Annotated[str, typer.Option(help="The backend the others are compared with.")] = "sdpa-math",
    exact_tol: Annotated[float, typer.Option(
        help="Exact kernels may err at most this many times as much as plain attention in the run's dtype.")] = 2.0,
    quantized_tol: Annotated[float, typer.Option(
        help="Quantized kernels may err at most this much (relative L2 error at kernel level).")] = 0.1,
    steps: StepsOpt = 30,
    guidance: GuidanceOpt = 7.5,
    width: WidthOpt = None,
    height: HeightOpt = None,
    scheduler: SchedulerOpt = "default",
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    device: DeviceOpt = "auto",
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the grid and JSON go.")] = Path("compare"),
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The same seed through every backend: same image or not, how far off, how fast. Exit 1 if any breaks its bound."""
    from sdcli import compare as cmp
    from sdcli import pipeline

    if exact_tol <= 0 or quantized_tol <= 0:
        raise SdcliError("--exact-tol and --quantized-tol must be positive")
    names = [n.strip() for n in backends_.split(",") if n.strip()] if backends_ else None
    settings = pipeline.Settings(prompts=[prompt], negative_prompt=negative_prompt, model=model, steps=steps,
                                 guidance=guidance, width=width, height=height, seed=seed, scheduler=scheduler,
                                 dtype=dtype, vae_dtype=vae_dtype, device=device, backend=reference,
                                 output_dir=output_dir)
    settings.validate()
    with err.status("comparing", spinner="dots") if not quiet and err.is_terminal else nullcontext() as status:
        result = cmp.compare(settings, names, reference, cmp.Thresholds(exact_tol, quantized_tol),
                             on_progress=(lambda text: status.update(f"comparing: {text}")) if status else None)
    result = cmp.save(result, output_dir)
    if json_out:
        emit_json(result)
    elif not quiet:
        print_compare(result)
    broken = [r["backend"] for r in result["rows"] if r["verdict"] in (cmp.FAIL, cmp.FAILED)]
    if broken:
        raise CompareFailed(f"{len(broken)} backend(s) broke their bound or failed: {', '.join(broken)}")


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def print_compare(result: dict) -> None:
    t = Table(title=f"{result['model']}, seed {result['seed']}, {result['steps']} steps, {result['dtype']} on "
                    f"{result['gpu']}, against {result['reference']}", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("backend", "verdict", "kernel err", "×round", "step err", "PSNR", "SSIM", "max|Δ|", "s", "GiB"):
        t.add_column(col, justify="left" if col in ("backend", "verdict") else "right")
    for r in result["rows"]:
        k = r.get("kernel") or {}
        style = {"pass": "green", "reference": "bold"}.get(r["verdict"], "red")
        kind = "" if r["verdict"] == "reference" else f" [dim]{r['kind'][:5]}[/]"
        psnr = "∞" if r.get("identical") else _fmt(r.get("psnr_db"), ".1f")
        t.add_row(r["backend"], f"[{style}]{r['verdict']}[/]{kind}", _fmt(k.get("max_rel_error"), ".1e"),
                  _fmt(k.get("max_ratio"), ".2f"), _fmt(r.get("step_rel_error"), ".1e"), psnr,
                  _fmt(r.get("ssim"), ".4f"), _fmt(r.get("max_abs_diff"), ".0f"), _fmt(r.get("seconds"), ".2f"),
                  _fmt(r.get("peak_memory_gb"), ".2f"))
    out.print(t)
    for r in result["rows"]:
        if r["verdict"] not in ("pass", "reference"):
            out.print(f"[red]{r['backend']} {r['verdict']}[/]: {r['why']}", soft_wrap=True)
        elif r.get("fallback_layers"):
            out.print(f"{r['backend']}: {r['fallback_layers']} of {r['layers']} layers served by "
                      f"{result['reference']} (the backend can't take them)", soft_wrap=True)
    t0 = result["thresholds"]
    out.print(f"kernel err: worst layer's relative error against fp32 math; ×round: that, over the error of plain "
              f"attention in {result['dtype']} (exact kernels pass at ≤ {t0['exact_tol']:g}×; quantized ones at a "
              f"relative error ≤ {t0['quantized_tol']:g}). step err: latent after step 1. max|Δ| in 0-255.",
              soft_wrap=True, style="dim")
    out.print(f"grid: {result['grid']}\nreport: {result['json']}", soft_wrap=True)


# ----- bench --------------------------------------------------------------------------------------------


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdcliError(f"{option} takes comma-separated whole numbers, like 1,2,4,8; not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SdcliError(f"{option} needs positive numbers, not {text!r}")
    return sorted(set(values))


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="As for generate; default: SD 1.5's architecture with "
                                                             "random weights (sd15-arch), no download.")] = "sd15-arch",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1,2,4,8,16",
    backends_: Annotated[Optional[str], typer.Option(
        "--backends", help="Comma-separated backends; default: every exact one usable here (not the slow "
                           "sdpa-math and eager flex). Stock diffusers and auto are always measured.")] = None,
    compile_: CompileOpt = False,
    channels_last: ChannelsLastOpt = False,
    fuse_qkv: FuseQkvOpt = False,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = 7.5,
    width: WidthOpt = None,
    height: HeightOpt = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per point; the median is reported.")] = 3,
    find_max: Annotated[bool, typer.Option(help="Search the largest batch that fits (doubling, then bisection).")] = True,
    max_batch: Annotated[int, typer.Option(help="Upper limit of that search.")] = 256,
    micro: Annotated[bool, typer.Option(help="Also time every backend alone at the model's attention shapes.")] = True,
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    device: DeviceOpt = "auto",
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the JSON and plot go.")] = Path("bench"),
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The throughput experiment: images/s by batch size for stock diffusers, each backend and auto; largest batch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sdcli import bench as bn
    from sdcli import pipeline

    sizes = parse_ints(batch_sizes, "--batch-sizes")
    if repeats < 1 or max_batch < 1:
        raise SdcliError("--repeats and --max-batch must be at least 1")
    names = [n.strip() for n in backends_.split(",") if n.strip()] if backends_ else None
    options = tuple(o for o, on in (("fuse-qkv", fuse_qkv), ("channels-last", channels_last), ("compile", compile_)) if on)
    settings = pipeline.Settings(prompts=["a photo of an astronaut riding a horse on mars"], model=model, steps=steps,
                                 guidance=guidance, width=width, height=height, seed=0, dtype=dtype,
                                 vae_dtype=vae_dtype, device=device, backend="sdpa", output_dir=output_dir)
    settings.validate()
    for name in names or []:
        settings.backend = name
        settings.validate()  # unknown names fail here, before loading anything
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=quiet or not err.is_terminal, transient=True) as bar:
        task = bar.add_task("loading the model", total=None)

        def on_progress(text, advance=0):
            bar.update(task, description=text, advance=advance)

        result = bn.bench(settings, sizes, repeats, names, options, find_max, max_batch, micro,
                          on_progress=on_progress)
    result = bn.save(result, output_dir)
    if json_out:
        emit_json(result)
    elif not quiet:
        print_bench(result)


def print_bench(r: dict) -> None:
    t = Table(title=f"{r['model']} {r['width']}x{r['height']}, {r['steps']} steps, CFG {r['guidance']:g}, {r['dtype']} on "
                    f"{r['gpu']}: images/s (whole pipeline, median of {r['repeats']})", title_justify="left",
              box=box.SIMPLE_HEAD)
    t.add_column("configuration")
    for b in r["batch_sizes"]:
        t.add_column(f"b={b}", justify="right")
    for col in ("best", "× diffusers", "s/img b=1", "max batch", "peak GiB"):
        t.add_column(col, justify="right")
    for c in r["configs"]:
        by_batch = {p["batch"]: p for p in c["points"]}
        cells = []
        for b in r["batch_sizes"]:
            p = by_batch.get(b)
            cells.append("-" if p is None else "OOM" if p["oom"] else f"{p['images_per_s']:.3f}")
        best = c["best"]
        peak = by_batch.get(best["batch"], {}).get("peak_gb") if best else None
        t.add_row(c["name"], *cells, f"{best['images_per_s']:.3f} @{best['batch']}" if best else "-",
                  _fmt(c.get("speedup_vs_diffusers"), ".2f"), _fmt(c.get("s_per_image_batch1"), ".3f"),
                  str(c["largest_batch"]) if c.get("largest_batch") is not None else "-", _fmt(peak, ".2f"))
    out.print(t)
    if r.get("attention"):
        a = Table(title="Attention kernels alone at the model's shapes (batch = 1 image with CFG): ms, TFLOP/s",
                  title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("shape", "batch", "fastest first (✗ = outside its accuracy bound)"):
            a.add_column(col, overflow="fold")
        for e in r["attention"]:
            rows = sorted(e["measurements"], key=lambda m: m.get("ms", float("inf")))
            cells = [f"{m['backend']} {m['ms']:.3f} ({m['tflops']:.2f})" + ("" if m["ok"] else " ✗")
                     if "ms" in m else f"{m['backend']} failed" for m in rows]
            shape = e["shape"]
            a.add_row(str(backends_shape(shape)), str(shape.get("batch")), ", ".join(cells))
        out.print(a)
    out.print(f"plot: {r['plot']}\njson: {r['json']}", soft_wrap=True)


def backends_shape(data: dict):
    from sdcli.backends import Shape

    return Shape(**data)
