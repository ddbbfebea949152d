"""Text-to-image: settings, work items, the generation loop, and images written safely with their recipe.

Work is a list of items (prompt, copy) numbered from 0; item n uses seed `seed + n` and a file name
made from n, the seed and the prompt. So an image is reproducible on its own, whatever the batch
size, the number of processes or what ran before it. A finished image is on disk before the next
batch starts, and no existing file is ever overwritten.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdcli import backends, devices, families, hardware, interrupt, lora, numerics, speed, timing
from sdcli.errors import Interrupted, RunFailed, SdcliError, first_line, plural
from sdcli.images import recipe, save_png

SCHEDULER_NAMES = list(dict.fromkeys(name for f in families.FAMILIES for name in f.schedulers))  # every family's
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")


@dataclass
class Settings:
    prompts: list[str]
    negative_prompt: str | None = None
    model: str = DEFAULT_MODEL
    steps: int = 30
    guidance: float | None = None  # None: the pipeline's own default (CFG scale, or Flux's distilled guidance)
    width: int | None = None   # None: the model's native size
    height: int | None = None
    seed: int | None = None    # None: a random one, recorded in every image
    batch_size: int = 1
    num_images: int = 1        # per prompt
    scheduler: str = "default"
    dtype: str = "auto"
    vae_dtype: str = "auto"
    device: str | None = None  # None: cuda if usable, else cpu
    backend: str = "auto"
    fallback: bool = False
    quantized: bool = False
    tune: bool = True          # `auto` measures its plan on first use (sdcli.tuning); False: the documented order
    retune: bool = False
    compile: bool = False      # torch.compile the denoiser (UNet or transformer)
    compile_mode: str = "default"  # torch.compile's mode (sdcli.speed.COMPILE_MODES)
    compile_vae: bool = False  # torch.compile the VAE's decode
    channels_last: bool = False
    fuse_qkv: bool = False     # diffusers' fused q/k/v projections
    tf32: bool = True          # TF32 for fp32 matmuls and convolutions on CUDA (diffusers' advice)
    cudnn_benchmark: bool = False  # cuDNN's autotuner for the convolutions
    loras: list[str] = field(default_factory=list)  # "FILE[:SCALE]", loaded through diffusers (sdcli.lora)
    threads: int | None = None  # torch's CPU threads; None: torch's own
    output_dir: Path | None = Path("outputs")  # None: nothing is written (the Python API's compare)

    def __post_init__(self):
        self.output_dir = None if self.output_dir is None else Path(self.output_dir)

    def apply_family(self) -> families.Family:
        """Recognise the model's family (before any weights load), check the settings that depend on it, and fill
        in its default guidance. Returns the family."""
        from sdcli import models

        family = models.recognise(self.model)
        family.check(self.scheduler, self.negative_prompt, self.width, self.height, self.fuse_qkv)
        if self.guidance is None:
            self.guidance = family.default_guidance()
        return family

    def validate(self) -> None:
        """Every check that needs no model: bad input fails here, before anything loads."""
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise SdcliError("give a prompt, or --prompts-file with one prompt per line")
        if not self.model.strip():
            raise SdcliError("--model is empty; give tiny, a Hub id, a folder or a checkpoint file")
        devices.parse(self.device)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                raise SdcliError(f"--{name} must be a positive multiple of 8, not {value}")
        for name in ("steps", "batch_size", "num_images"):
            if getattr(self, name) < 1:
                raise SdcliError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.guidance is not None and (not math.isfinite(self.guidance) or self.guidance < 0):
            raise SdcliError(f"--guidance must be a finite number ≥ 0, not {self.guidance}")
        if self.seed is not None and not 0 <= self.seed < 2**63 - len(self.prompts) * self.num_images:
            raise SdcliError(f"--seed must be between 0 and 2**63, not {self.seed}")
        if self.scheduler != "default" and self.scheduler not in SCHEDULER_NAMES:
            raise SdcliError(f"unknown --scheduler {self.scheduler!r}; choose default, {', '.join(SCHEDULER_NAMES)}")
        for name in ("dtype", "vae_dtype"):
            if getattr(self, name) not in DTYPE_CHOICES:
                raise SdcliError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPE_CHOICES)}")
        if self.compile_mode not in speed.COMPILE_MODES:
            raise SdcliError(f"--compile-mode must be one of {', '.join(speed.COMPILE_MODES)}, "
                             f"not {self.compile_mode!r}")
        if self.compile_mode != "default" and not (self.compile or self.compile_vae):
            raise SdcliError("--compile-mode needs --compile or --compile-vae")
        if self.threads is not None and self.threads < 1:
            raise SdcliError(f"--threads must be at least 1, not {self.threads}")
        lora.parse_all(self.loras)
        if self.backend != "auto":
            backends.get(self.backend)  # an unknown name fails here
        if self.output_dir is not None:
            check_output_dir(self.output_dir)


def check_output_dir(folder: Path) -> None:
    """Can images be written to `folder`? Tried with a probe file; folders made for the probe are removed again,
    so a run that fails before its first image leaves no empty folder behind (writers make it: images.write_new)."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".sdcli-write-test-{os.getpid()}-{secrets.token_hex(4)}"  # pids repeat across nodes
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SdcliError(f"cannot write to output folder {folder}: {exc.strerror or exc}") from None
    finally:
        for path in made:  # deepest first
            try:
                path.rmdir()
            except OSError:  # not empty after all (another process writes there too): it stays
                break


def read_prompts_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SdcliError(f"cannot read prompts file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SdcliError(f"prompts file {path} has no prompts (one per line)")
    return prompts


@dataclass(frozen=True)
class Item:
    index: int
    prompt: str
    seed: int

    @property
    def stem(self) -> str:
        slug = ""
        for word in re.findall(r"[a-z0-9]+", self.prompt.lower()):  # whole words, up to 40 characters
            if len(slug) + len(word) + 1 > 40:
                break
            slug = f"{slug}-{word}" if slug else word
        slug = slug or re.sub(r"[^a-z0-9]", "", self.prompt.lower())[:40] or "image"
        return f"{self.index:05d}-{self.seed}-{slug}"


def work_items(settings: Settings) -> list[Item]:
    """Item n is prompt n // num_images; its seed is seed + n: visible, and independent of batching."""
    n = settings.num_images
    return [Item(i, settings.prompts[i // n], settings.seed + i) for i in range(len(settings.prompts) * n)]


@dataclass
class ImageResult:
    item: Item
    path: Path
    seconds: float
    problem: str | None = None

    def to_json(self) -> dict:
        return {"item": self.item.index, "prompt": self.item.prompt, "seed": self.item.seed,
                "file": str(self.path), "seconds": round(self.seconds, 4), "problem": self.problem}


@dataclass
class Run:
    """Everything about one generate run; filled in as it goes, so an interrupted run still says what it kept."""

    settings: Settings
    report: dict
    device: str
    dtype: str
    vae_dtype: str
    pipe: object = None
    model_name: str = ""
    router: object = None
    sampler: str = ""
    tuning: dict | None = None  # the measured plan `auto` used
    speed: dict = field(default_factory=dict)  # the speed options in effect (sdcli.speed)
    images: list[ImageResult] = field(default_factory=list)
    seconds: float = 0.0
    load_seconds: float = 0.0
    peak_memory_gb: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height): the settings' own, or the model's native size."""
        native = native_size(self.pipe)
        return self.settings.width or native, self.settings.height or native

    def summary(self) -> dict:
        n = len(self.images)
        return {
            "settings": settings_json(self.settings),
            "images": [r.to_json() for r in self.images],
            "output_dir": str(self.settings.output_dir),
            "model": self.model_name, "width": self.size[0], "height": self.size[1], "device": self.device,
            "dtype": self.dtype, "vae_dtype": self.vae_dtype,
            "sampler": self.sampler, "backend": self.settings.backend,
            "seconds": round(self.seconds, 3), "load_seconds": round(self.load_seconds, 3),
            "seconds_per_image": round(self.seconds / n, 4) if n else None,
            "images_per_second": round(n / self.seconds, 4) if n and self.seconds else None,
            "peak_gpu_memory_gb": self.peak_memory_gb,
            "attention": self.router.to_json() if self.router else None,
            "tuning": self.tuning, "speed": self.speed,
            "problems": [r.to_json() for r in self.images if r.problem],
        }


def kept(run: Run) -> str:
    n = len(run.images)
    return f"{plural(n, 'finished image')} kept in {run.settings.output_dir}" if n else "no image was finished"


def resume_hint(settings: Settings) -> str:
    """How to finish a run that stopped: the same command with --resume, and the seed its images are named by
    (without --seed it was random, so --resume needs it said)."""
    return f"to make the rest, run the same command with --resume --seed {settings.seed}"


def run_failed(run: Run, todo: list[Item], exc: Exception, rank: int | None = None) -> RunFailed:
    """A run's failure as one line that says where it broke (the first unfinished item: the batch that broke)
    and what was kept. In one rank's share, "image k" means little: it names the item."""
    saved = {r.item.index for r in run.images}
    failed = next((item for item in todo if item.index not in saved), None)
    if failed and rank is None:
        where = f" in image {len(saved) + 1} (item {failed.index}, seed {failed.seed})"
    else:
        where = f" in item {failed.index} (seed {failed.seed})" if failed else ""
    who = "" if rank is None else f"rank {rank}: "
    hint = f"; {resume_hint(run.settings)}" if run.images else ""
    return RunFailed(f"{who}{type(exc).__name__}{where}: {first_line(exc)}; {kept(run)}{hint}")


def check_runs_here(name: str, machine: hardware.Machine, option: str = "--backend") -> None:
    """A backend the user named must be able to run on this machine at all, or the run stops before the model
    loads, with doctor's reason and fix (--fallback is for the layers it can't take, not for all of them)."""
    verdict = backends.get(name).verdict(machine)
    if not verdict.usable:
        fix = f"; fix: {verdict.fix}" if verdict.fix else ""
        raise SdcliError(f"{option} {name} can't run here ({verdict.status}): {verdict.reason}{fix} "
                         "(sdcli doctor lists what can)")


def prepare(settings: Settings, report: dict | None = None, on_progress=None, judged: bool = False) -> Run:
    """Validate, probe, load the model, set the scheduler, measure or read `auto`'s plan, route attention and
    apply the speed options. Nothing is generated yet. on_progress(text) hears about slow steps. `judged`: the
    caller will judge kernels at the model's shapes (compare, bench), which memory.check counts."""
    from sdcli import memory, models, routing, tuning

    if settings.seed is None:
        settings.seed = secrets.randbelow(2**32)
    settings.validate()
    family = settings.apply_family()  # an unsupported model fails before its weights load
    report = report or hardware.probe()
    device = devices.choose(report, settings.device)
    machine = hardware.Machine(report, device)
    if settings.backend != "auto":
        check_runs_here(settings.backend, machine)
    dtype = hardware.default_dtype(machine) if settings.dtype == "auto" else settings.dtype
    memory.check(settings, family, machine, dtype, dtype if settings.vae_dtype == "auto" else settings.vae_dtype,
                 judged)  # a size that can't fit stops here, not after minutes or the OS's out-of-memory killer
    t0 = time.perf_counter()
    pipe, name = models.load(settings.model, dtype, device)
    lora.load(pipe, lora.parse_all(settings.loras))
    vae_dtype = settings.vae_dtype
    if vae_dtype == "auto":  # fp16 VAEs overflow into NaN/black; diffusers marks those with force_upcast
        vae_dtype = "fp32" if dtype == "fp16" and getattr(pipe.vae.config, "force_upcast", False) else dtype
    if vae_dtype != dtype:
        vae_in_its_dtype(pipe, vae_dtype)
    sampler = set_scheduler(pipe, settings.scheduler)
    run = Run(settings, report, device, dtype, vae_dtype, pipe=pipe, model_name=name, sampler=sampler)
    mode, note = speed.compile_mode(settings.compile_mode, device)
    run.speed = {"compile": mode if settings.compile else None, "compile_vae": mode if settings.compile_vae else None,
                 "fuse_qkv": settings.fuse_qkv, "channels_last": settings.channels_last,
                 **speed.set_precision(device, settings.tf32, settings.cudnn_benchmark)}
    if note and (settings.compile or settings.compile_vae):
        run.speed["note"] = note
    speed.apply(pipe, settings.fuse_qkv, settings.channels_last)
    preferred = None
    if settings.backend == routing.AUTO and settings.tune:
        run.tuning = tuning.load_or_tune(run, one_step, settings.quantized, settings.retune, on_progress)
        preferred = tuning.preferences(run.tuning)
    run.router = routing.route(pipe, routing.Router.for_request(
        settings.backend, report, device, settings.fallback, settings.quantized, preferred))
    speed.compile(pipe, mode, denoiser=settings.compile, vae=settings.compile_vae)
    run.load_seconds = time.perf_counter() - t0
    return run


def wrap(pipe, settings: Settings, report: dict | None = None, name: str | None = None) -> Run:
    """A Run around a pipeline the caller built (the Python API): its device, dtypes and scheduler as they are,
    nothing routed yet."""
    if settings.seed is None:
        settings.seed = secrets.randbelow(2**32)
    settings.validate()
    family = families.of_pipeline(pipe)
    if settings.guidance is None:
        settings.guidance = family.default_guidance(type(pipe).__name__)
    denoiser = getattr(pipe, family.denoiser)
    device = str(denoiser.device)
    report = report or hardware.probe(only_gpu=denoiser.device.index)
    return Run(settings, report, device, numerics.dtype_name(denoiser.dtype), numerics.dtype_name(pipe.vae.dtype),
               pipe=pipe, model_name=name or type(pipe).__name__, sampler=set_scheduler(pipe, "default"))


def vae_in_its_dtype(pipe, vae_dtype: str) -> None:
    """The VAE in another dtype than the denoiser: the pipeline decodes as always, and the latents are cast as they
    enter the VAE's first layer."""
    vae = pipe.vae.to(numerics.torch_dtype(vae_dtype))
    first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
    first.register_forward_pre_hook(lambda module, args: (args[0].to(vae.dtype), *args[1:]))


def one_step(run: Run, batch: int | None = None) -> None:
    """A one-step render of the first item at `batch` (default: the run's batch size): enough to meet every
    attention shape of the run (see tuning.collect_shapes)."""
    render(run, work_items(run.settings)[:1] * (batch or run.settings.batch_size), steps=1)


def set_scheduler(pipe, name: str) -> str:
    """Swap in the named scheduler of the pipeline's family (from the model's own config); return its A1111
    sampler name."""
    import diffusers

    schedulers = families.of_pipeline(pipe).schedulers
    if name != "default":
        cls_name, overrides, _ = schedulers[name]
        if overrides.get("use_flow_sigmas") and "shift" in pipe.scheduler.config:
            overrides = {"flow_shift": pipe.scheduler.config.shift, **overrides}  # FlowMatch's `shift`, renamed
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    cls_name = type(pipe.scheduler).__name__
    karras = bool(getattr(pipe.scheduler.config, "use_karras_sigmas", False))
    for c, overrides, sampler in schedulers.values():
        if c == cls_name and bool(overrides.get("use_karras_sigmas", False)) == karras:
            return sampler
    return cls_name


def generate(run: Run, items: list[Item] | None = None, on_step=None, on_image=None, skip=frozenset(),
             rank: int | None = None) -> Run:
    """Generate `items` (default: all of the settings' work) in batches, saving each image under its item's
    stem as it finishes. on_step(step, latents) and on_image(result) report progress. `skip`: indices of items
    already on disk. A batch of only those is not run; in a batch with others they are made again but not saved,
    so that the others get the pixels of the same batch run in one go. A run that stops says so in one line,
    with what it kept and how to go on: Ctrl-C is Interrupted, any other failure RunFailed (`rank` names the
    process where there are several)."""
    s = run.settings
    items = work_items(s) if items is None else items
    who = "" if rank is None else f"rank {rank}: "
    kept_now = lambda: kept(run) + (f"; {resume_hint(s)}" if run.images else "")  # noqa: E731
    interrupt.on_force(lambda: who + kept_now())  # a Ctrl-C inside one long operation: images are whole on disk
    try:
        with devices.peak_memory(run.device) as peak:
            for start in range(0, len(items), s.batch_size):
                batch = items[start:start + s.batch_size]
                if all(item.index in skip for item in batch):
                    continue
                with timing.stopwatch(run.device) as watch:
                    images, problems = render(run, batch, on_step)
                seconds = watch.seconds / len(batch)
                run.seconds += seconds * len(batch)
                for item, image, problem in zip(batch, images, problems):
                    if item.index in skip:
                        continue
                    path = save_png(image, s.output_dir, item.stem, recipe(run, item))
                    result = ImageResult(item, path, seconds, problem)
                    run.images.append(result)
                    if on_image:
                        on_image(result)
    except KeyboardInterrupt:
        raise Interrupted(f"{who}interrupted: {kept_now()}") from None
    except SdcliError:
        raise
    except Exception as exc:
        if os.environ.get("SDCLI_DEBUG"):
            raise
        raise run_failed(run, [item for item in items if item.index not in skip], exc, rank) from None
    finally:
        interrupt.on_force(None)
    run.peak_memory_gb = peak.gb
    return run


def render(run: Run, batch: list[Item], on_step=None, steps: int | None = None):
    """One pipeline call for a batch, decoded by the pipeline itself (its scaling, shift, unpacking and VAE).
    The last step's latents are kept to tell a denoiser's NaN from the VAE's. Returns (images as float arrays
    in [0, 1], one problem or None per image)."""
    import numpy as np
    import torch

    s, pipe = run.settings, run.pipe
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]  # same latents on any device
    last = {}

    def step_end(_pipe, step, _t, kwargs):
        last["latents"] = kwargs["latents"]
        if on_step:
            on_step(step, kwargs["latents"])
        return kwargs

    # both sides, always: diffusers' SD pipeline replaces a lone width (or height) with its default size
    width, height = run.size
    with torch.inference_mode():
        images = pipe(
            prompt=[item.prompt for item in batch],
            negative_prompt=[s.negative_prompt] * len(batch) if s.negative_prompt else None,
            num_inference_steps=steps or s.steps, guidance_scale=s.guidance, width=width, height=height,
            generator=generators, output_type="np", callback_on_step_end=step_end,
        ).images
        bad_latents = torch.isnan(last["latents"].flatten(1)).any(1).tolist()
    problems = []
    for bad, image in zip(bad_latents, images):
        if bad:
            denoiser = families.of_pipeline(pipe).denoiser
            problems.append(f"NaN in the latents: the {denoiser} overflowed in {run.dtype} or the attention kernel "
                            "failed; try --dtype bf16 (or fp32), or another --backend")
        elif np.isnan(image).any():
            problems.append(f"NaN after the VAE in {run.vae_dtype}: run it with --vae-dtype fp32")
        elif image.max() < 0.02:
            problems.append("black image: every pixel below 2%; try --vae-dtype fp32 or --dtype bf16")
        else:
            problems.append(None)
    return images, problems


def native_size(pipe) -> int:
    return families.of_pipeline(pipe).native_size(pipe)


def settings_json(settings: Settings) -> dict:
    data = asdict(settings)
    data["output_dir"] = None if settings.output_dir is None else str(settings.output_dir)
    return data
