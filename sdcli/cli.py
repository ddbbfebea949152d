"""The `sdcli` command: typer commands and their options, and nothing else.

Each command parses its options, calls sdcli's public Python API (api.py) and hands the result to views.py; the
exit status is the error's (errors.py). Only typer, rich and sdcli's light modules load at start-up; torch and
diffusers load inside the API calls, so `sdcli --help` and completions stay fast.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from typer.core import TyperGroup

import sdcli
from sdcli import api, views
from sdcli.errors import CompareFailed, Interrupted, SdcliError

# flex warns on every eager call; `sdcli doctor` already labels it "slow unless compiled"
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


# click's UsageError (a bad value, an unknown option or command, a missing value), wherever this typer takes
# click from (typer 0.29 has its own copy): BadParameter's base.
UsageError = typer.BadParameter.__mro__[1]


def flags_read_as_flags(command, ctx) -> None:
    """typer's rich help shows a flag's type, `<bool>`, as if the flag took a value: an empty metavar hides it."""
    for param in [*getattr(command, "params", []), command and command.get_help_option(ctx)]:
        if getattr(param, "is_flag", False):
            param.metavar = ""


class Group(TyperGroup):
    """Bad input is one line on stderr and a non-zero exit, never a traceback (SDCLI_DEBUG=1 shows it); usage
    errors too, instead of typer's boxed usage text. Ctrl-C outside a command's own handling is exit 130."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except UsageError as exc:
            usage_error(exc)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        flags_read_as_flags(command, ctx)
        return command

    def format_help(self, ctx, formatter):
        flags_read_as_flags(self, ctx)
        return super().format_help(ctx, formatter)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            usage_error(exc)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits
            raise
        except KeyboardInterrupt:  # e.g. while the model loads: nothing made yet (a command keeps what it made)
            views.err.print("interrupted", soft_wrap=True)
            raise typer.Exit(130) from None
        except Interrupted as exc:  # what it kept, and how to go on: said as it is, not as an error
            views.say(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except SdcliError as exc:
            views.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:  # the reader went away (`sdcli doctor | head`): not an error, and nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush can't fail again
            raise typer.Exit(1) from None  # as click does when its own output (--help) finds the pipe closed
        except Exception as exc:
            if os.environ.get("SDCLI_DEBUG"):
                raise
            views.error(f"{type(exc).__name__}: {exc}  (SDCLI_DEBUG=1 shows the traceback)")
            raise typer.Exit(1) from None


def usage_error(exc) -> NoReturn:
    """One line, like sdcli's own errors; exit 2. `sdcli` alone still shows the help (NoArgsIsHelpError)."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        raise exc
    where = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
    views.error(f"{exc.format_message()}{where}")
    raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=Group,
    help="Stable Diffusion with the fastest attention kernel that is correct on this GPU, and the evidence.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]


def version_callback(value: bool) -> None:
    if value:
        views.out.print(f"sdcli {sdcli.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=version_callback, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """sdcli: doctor, generate, compare, bench."""


# ----- what the options' text means ---------------------------------------------------------------------------


def finite(value: float | None) -> float | None:
    """typer callback for every float option: `nan`, `inf` and `1e400` parse as floats but mean nothing here."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, not {value}")
    return value


def names(text: str | None, option: str) -> list[str] | None:
    """A comma-separated list of names: None when the option is not given; when given, at least one name."""
    if text is None:
        return None
    items = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not items:
        raise SdcliError(f"{option} needs at least one name, not {text!r}")
    return items


def whole_numbers(text: str, option: str) -> list[int]:
    """Comma-separated positive whole numbers, sorted, each once."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdcliError(f"{option} takes comma-separated whole numbers, like 1,2,4,8; not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SdcliError(f"{option} needs positive numbers, not {text!r}")
    return sorted(set(values))


def read_prompts_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SdcliError(f"cannot read prompts file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SdcliError(f"prompts file {path} has no prompts (one per line)")
    return prompts


# ----- doctor -----------------------------------------------------------------------------------------


@app.command()
def doctor(
    json_out: JsonOpt = False,
    report: Annotated[Optional[Path], typer.Option(
        "--report", help="Judge a saved `sdcli doctor --json` (e.g. from another machine) instead of this one.")] = None,
    probe: Annotated[bool, typer.Option(
        "--probe", help="Run every usable backend once at SD attention shapes: error vs fp32 and time.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Judge for this device (cuda:N or cpu).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Judge shapes in this dtype: fp16, bf16 or fp32.")] = None,
    family: Annotated[Optional[str], typer.Option(
        help="Judge and probe only the layer shapes of this model family: sd1, sd2, sdxl, sd3.5, flux or vae.")] = None,
) -> None:
    """What this machine can run: GPU, packages, and a verdict with a fix for every attention backend."""
    bar, on_progress = views.probe_progress(enabled=probe and not json_out)
    with bar:
        result = api.doctor(device=device, dtype=dtype, probe=probe, report=report, on_progress=on_progress,
                            family=family)
    if json_out:
        views.emit_json(result)
    else:
        views.print_doctor(result)
    if result.get("probe_interrupted"):
        cut = result["probe_interrupted"]
        views.interrupted(f"the probe measured {cut['shapes_done']} of {cut['shapes_planned']} shapes (kept in the "
                          "output above); to finish, run " + " and ".join(
                              f"sdcli doctor --probe --family {f}" for f in cut["families_left"]))
        raise typer.Exit(130)


def main() -> None:
    api.watch_ctrl_c()  # Ctrl-C answers even inside one long torch operation
    app(prog_name="sdcli")  # also under `python -m sdcli`, so completion and usage say `sdcli`


# ----- generate -----------------------------------------------------------------------------------------

BackendOpt = Annotated[str, typer.Option(
    "--backend", "-b", help="auto, or an attention backend (see `sdcli doctor`). A named backend that can't serve "
                            "a layer is an error unless --fallback.")]
BUILTINS = ", ".join(api.BUILTIN_MODELS)
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help=f"A built-in model ({BUILTINS}: offline; shapes is trained, 64² pictures of coloured "
                          "shapes such as a red circle on a blue background; the others have random weights: tiny* "
                          "are small, *-arch are the full-size architectures, for bench), a Hub id, a diffusers "
                          "folder, or a .safetensors/.ckpt file (its config comes from the Hub).")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on SM80+ GPUs, fp16 on older ones, fp32 on CPU), fp16, "
                                            "bf16 or fp32.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
FallbackOpt = Annotated[bool, typer.Option(help="Let other backends serve the layers a named --backend can't.")]
QuantizedOpt = Annotated[bool, typer.Option(
    "--quantized", help="Let --backend auto use quantized kernels (SageAttention): faster, results move more.")]
NegativeOpt = Annotated[Optional[str], typer.Option("--negative-prompt", "-n", help="What to keep out of the image.")]
StepsOpt = Annotated[int, typer.Option(help="Denoising steps.")]
GuidanceOpt = Annotated[Optional[float], typer.Option(
    help="Guidance scale; default: the pipeline's own. Classifier-free guidance (doubles the denoiser's batch) for SD "
         "1.x to 3.5; for Flux, the distilled guidance the model takes as an input.", callback=finite)]
SIZE_STEPS = "; ".join(f"{family}: a multiple of {step}" for family, step in api.SIZE_STEPS.items())
WidthOpt = Annotated[Optional[int], typer.Option(help=f"Pixels ({SIZE_STEPS}); default: the model's native size.")]
HeightOpt = Annotated[Optional[int], typer.Option(help=f"Pixels ({SIZE_STEPS}); default: the model's native size.")]
LoraOpt = Annotated[Optional[list[str]], typer.Option(
    "--lora", metavar="FILE[:SCALE]", help="A LoRA file, as FILE or FILE:SCALE (default scale 1), loaded through "
                                           "diffusers (PEFT); repeat for several. The PNG recipe names each with "
                                           "its A1111 hash.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    help="CPU threads for torch (default: torch's own, one per core). On a busy machine one thread can be many "
         "times faster; on a CPU the thread count also changes how results round.")]
SchedulerOpt = Annotated[str, typer.Option(
    help="default (the model's own); SD 1.x/2.x, SDXL: euler, euler-a, dpm++2m, dpm++2m-karras, ddim, pndm, unipc, "
         "heun; SD 3, Flux (flow matching): euler, euler-karras, dpm++2m, unipc.")]
VaeDtypeOpt = Annotated[str, typer.Option(help="auto (fp32 when fp16 would overflow), fp16, bf16 or fp32.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, summary or tables.")]
TuneOpt = Annotated[bool, typer.Option(
    help="--backend auto measures the fastest backend per layer shape on first use and caches it; --no-tune "
         "uses the documented order instead.")]
RetuneOpt = Annotated[bool, typer.Option("--retune", help="Measure auto's plan again, ignoring the cached one.")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the UNet or transformer (the first call of each batch size runs eagerly, the "
                      "next compiles).")]
CompileModeOpt = Annotated[str, typer.Option(
    help="torch.compile's mode: default, reduce-overhead (CUDA graphs) or max-autotune. Without a CUDA GPU, "
         "no CUDA graphs: reduce-overhead compiles in default mode.")]
CompileVaeOpt = Annotated[bool, typer.Option("--compile-vae", help="torch.compile the VAE's decode too.")]
Tf32Opt = Annotated[bool, typer.Option(
    help="TF32 for fp32 matmuls and convolutions on CUDA GPUs (diffusers' advice); --no-tf32 keeps full fp32.")]
CudnnBenchmarkOpt = Annotated[bool, typer.Option(
    "--cudnn-benchmark", help="Let cuDNN time its convolution algorithms (the VAE's) and keep the fastest; "
                              "the pixels may then differ between runs.")]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last",
                                                help="Denoiser and VAE in channels-last memory format.")]
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
    compile_mode: CompileModeOpt = "default",
    compile_vae: CompileVaeOpt = False,
    channels_last: ChannelsLastOpt = False,
    fuse_qkv: FuseQkvOpt = False,
    tf32: Tf32Opt = True,
    cudnn_benchmark: CudnnBenchmarkOpt = False,
    lora: LoraOpt = None,
    steps: StepsOpt = 30,
    guidance: GuidanceOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Image n of the run uses seed+n; default: random.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per pipeline call.")] = 1,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    scheduler: SchedulerOpt = "default",
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
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
    if prompt and prompts_file:
        raise SdcliError("give a PROMPT or --prompts-file, not both")
    prompts = read_prompts_file(prompts_file) if prompts_file else [prompt] if prompt else []
    sdcli.generate(
        prompts, model, resume=resume, view=views.GenerateView(json_out, quiet, verbose),
        negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width, height=height, seed=seed,
        batch_size=batch_size, num_images=num_images, scheduler=scheduler, dtype=dtype, vae_dtype=vae_dtype,
        device=device, backend=backend, fallback=fallback, quantized=quantized, tune=tune, retune=retune,
        compile=compile_, compile_mode=compile_mode, compile_vae=compile_vae, channels_last=channels_last,
        fuse_qkv=fuse_qkv, tf32=tf32, cudnn_benchmark=cudnn_benchmark, loras=lora or [], threads=threads,
        output_dir=output_dir)


# ----- compare ------------------------------------------------------------------------------------------


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
        help="Exact kernels may err at most this many times the rounding of the exact result to the run's dtype "
             "(fp32: fp32 arithmetic's own error), in every layer. Correct kernels measured 0.96-1.45×, planted "
             "faults (scale 1% off, a key dropped, 0.4% bias) 3.6× and more: docs/bound.md.",
        callback=finite)] = api.EXACT_TOL,
    quantized_tol: Annotated[float, typer.Option(
        help="Quantized kernels may err at most this much in every layer (relative L2 error at kernel level).",
        callback=finite)] = api.QUANTIZED_TOL,
    steps: StepsOpt = 30,
    guidance: GuidanceOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    scheduler: SchedulerOpt = "default",
    lora: LoraOpt = None,
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the grid and JSON go.")] = Path("compare"),
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The same seed through every backend: same image or not, how far off, how fast. Exit 1 if any breaks its bound."""
    spinner, on_progress = views.status("comparing", quiet)
    with spinner:
        result = sdcli.compare(
            model, prompt=prompt, seed=seed, steps=steps, guidance=guidance, negative_prompt=negative_prompt,
            width=width, height=height, backends=names(backends_, "--backends"), reference=reference,
            exact_tol=exact_tol, quantized_tol=quantized_tol, output_dir=output_dir, on_progress=on_progress,
            on_warning=views.warning, scheduler=scheduler, loras=lora or [], dtype=dtype, vae_dtype=vae_dtype,
            device=device, threads=threads)
    if json_out:
        views.emit_json(result)
    elif not quiet:
        views.print_compare(result)
    if result.get("interrupted"):
        cut = result["interrupted"]
        views.interrupted(f"{cut['backends_done']} of {cut['backends_planned']} backends compared, kept in "
                          f"{result['json']} and {result['grid']}; to finish, run the same command with --backends "
                          f"{','.join(cut['left'])}")
        raise typer.Exit(130)
    broken = [r["backend"] for r in result["rows"] if r["verdict"] in ("FAIL", "failed")]
    if broken:
        raise CompareFailed(broken)


# ----- bench --------------------------------------------------------------------------------------------


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", "-m", help="As for generate; default: SD 1.5's architecture with "
                                                             "random weights (sd15-arch), no download.")] = "sd15-arch",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1,2,4,8,16",
    backends_: Annotated[Optional[str], typer.Option(
        "--backends", help="Comma-separated backends; default: every exact one usable here (not the slow "
                           "sdpa-math and eager flex). Stock diffusers and auto are always measured.")] = None,
    compile_: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    compile_vae: CompileVaeOpt = False,
    channels_last: ChannelsLastOpt = False,
    fuse_qkv: FuseQkvOpt = False,
    tf32: Tf32Opt = True,
    cudnn_benchmark: CudnnBenchmarkOpt = False,
    lora: LoraOpt = None,
    steps: StepsOpt = 50,
    guidance: GuidanceOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per point; the median is reported.")] = 3,
    find_max: Annotated[bool, typer.Option(help="Search the largest batch that fits (doubling, then bisection).")] = True,
    max_batch: Annotated[int, typer.Option(help="Upper limit of that search.")] = 256,
    micro: Annotated[bool, typer.Option(help="Also time every backend alone at the model's attention shapes.")] = True,
    dtype: DtypeOpt = "auto",
    vae_dtype: VaeDtypeOpt = "auto",
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the JSON and plot go.")] = Path("bench"),
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The throughput experiment: images/s by batch size for stock diffusers, each backend and auto (and, with speed
    options, stock diffusers and auto with them); largest batch."""
    bar, on_progress = views.bench_progress(quiet)
    with bar:
        result = sdcli.bench(
            model, batch_sizes=whole_numbers(batch_sizes, "--batch-sizes"), repeats=repeats,
            backends=names(backends_, "--backends"), find_max=find_max, max_batch=max_batch, micro=micro,
            output_dir=output_dir, on_progress=on_progress, on_warning=views.warning, compile=compile_,
            compile_mode=compile_mode, compile_vae=compile_vae, channels_last=channels_last, fuse_qkv=fuse_qkv,
            tf32=tf32, cudnn_benchmark=cudnn_benchmark, loras=lora or [], steps=steps, guidance=guidance,
            width=width, height=height, dtype=dtype, vae_dtype=vae_dtype, device=device, threads=threads)
    if json_out:
        views.emit_json(result)
    elif not quiet:
        views.print_bench(result)
    if result.get("interrupted"):
        views.interrupted(views.bench_kept(result))
        raise typer.Exit(130)
