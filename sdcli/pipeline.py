"""Text-to-image: a run resolved from its options, work items, the generation loop, and images written safely with
their recipe.

Work is a list of items (prompt, copy) numbered from 0; item n uses seed `seed + n` and a file name
made from n, the seed and the prompt. So an image is reproducible on its own, whatever the batch
size, the number of processes or what ran before it. A finished image is on disk before the next
batch starts, and no existing file is ever overwritten.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdcli import backends, devices, families, hardware, interrupt, lora, numerics, speed, timing
from sdcli.errors import Interrupted, RunFailed, SdcliError, first_line, plural
from sdcli.images import recipe, save_png
from sdcli.options import Options


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


def work_items(options: Options) -> list[Item]:
    """Item n is prompt n // num_images; its seed is seed + n: visible, and independent of batching."""
    work = options.work
    n = work.num_images
    return [Item(i, work.prompts[i // n], work.seed + i) for i in range(len(work.prompts) * n)]


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
    """One run: its options (resolved: seed and guidance filled in), its family, the machine it runs on, and what it
    made; filled in as it goes, so an interrupted run still says what it kept."""

    options: Options
    family: families.Family
    machine: hardware.Machine  # the hardware report, for the run's device
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
    def device(self) -> str:
        return self.machine.device

    @property
    def report(self) -> dict:
        return self.machine.report

    @property
    def size(self) -> tuple[int, int]:
        """(width, height): the options' own, or the model's native size."""
        native = self.family.native_size(self.pipe)
        return self.options.sampling.width or native, self.options.sampling.height or native

    def to_json(self) -> dict:
        """The run as `sdcli generate --json` prints it."""
        n = len(self.images)
        return {
            "settings": self.options.flat(),
            "images": [r.to_json() for r in self.images],
            "output_dir": str(self.options.work.output_dir),
            "model": self.model_name, "width": self.size[0], "height": self.size[1], "device": self.device,
            "dtype": self.dtype, "vae_dtype": self.vae_dtype,
            "sampler": self.sampler, "backend": self.options.attention.backend,
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
    return f"{plural(n, 'finished image')} kept in {run.options.work.output_dir}" if n else "no image was finished"


def resume_hint(options: Options) -> str:
    """How to finish a run that stopped: the same command with --resume, and the seed its images are named by
    (without --seed it was random, so --resume needs it said)."""
    return f"to make the rest, run the same command with --resume --seed {options.work.seed}"


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
    hint = f"; {resume_hint(run.options)}" if run.images else ""
    return RunFailed(f"{who}{type(exc).__name__}{where}: {first_line(exc)}; {kept(run)}{hint}")


def check_runs_here(name: str, machine: hardware.Machine, option: str = "--backend") -> None:
    """A backend the user named must be able to run on this machine at all, or the run stops before the model
    loads, with doctor's reason and fix (--fallback is for the layers it can't take, not for all of them)."""
    verdict = backends.get(name).verdict(machine)
    if not verdict.usable:
        raise SdcliError(f"{option} {name} {verdict.refusal()} (sdcli doctor lists what can)")


def resolve(options: Options) -> Options:
    """The options checked (bad input fails here, before anything loads, and so do options the model's family
    can't take: the family is known before any weights load), with the defaults that need no machine filled in:
    the family's own guidance and a random seed. Resolved options resolve to themselves."""
    from sdcli import models

    options.validate()
    family = models.recognise(options.model)
    sampling = options.sampling
    family.refuse_unfit(sampling.scheduler, sampling.negative_prompt, sampling.width, sampling.height, options.speed.fuse_qkv)
    return with_defaults(options, family.default_guidance)


def with_defaults(options: Options, default_guidance) -> Options:
    """The options with the pipeline's own guidance (`default_guidance()`) and a random seed where none was given."""
    guidance = default_guidance() if options.sampling.guidance is None else options.sampling.guidance
    seed = secrets.randbelow(2**32) if options.work.seed is None else options.work.seed
    return replace(options, work=replace(options.work, seed=seed), sampling=replace(options.sampling, guidance=guidance))


def machine_for(options: Options, report: dict | None = None) -> hardware.Machine:
    """The machine a run of these options uses: the hardware report (this machine's, probed now, unless given) for
    the device `--device` chooses."""
    report = report or hardware.probe()
    return hardware.Machine(report, devices.choose(report, options.placement.device))


def prepare(options: Options, machine: hardware.Machine | None = None, on_progress=None, judged: bool = False) -> Run:
    """Resolve the options, probe the machine, load the model, set the scheduler, measure or read `auto`'s plan,
    route attention and apply the speed options. Nothing is generated yet. on_progress(text) hears about slow
    steps. `judged`: the caller will judge kernels at the model's shapes (compare, bench), which memory.check
    counts."""
    from sdcli import memory, models, routing, tuning

    options = resolve(options)
    family = models.recognise(options.model)
    machine = machine or machine_for(options)
    choice, placement, speed_options = options.attention, options.placement, options.speed
    if choice.backend != routing.AUTO:
        check_runs_here(choice.backend, machine)
    dtype = hardware.default_dtype(machine) if placement.dtype == "auto" else placement.dtype
    memory.must_fit(options, family, machine, dtype, dtype if placement.vae_dtype == "auto" else placement.vae_dtype,
                 judged)  # a size that can't fit stops here, not after minutes or the OS's out-of-memory killer
    t0 = time.perf_counter()
    pipe, name = models.load(options.model, dtype, machine.device)
    lora.load(pipe, lora.parse_all(options.sampling.loras))
    vae_dtype = placement.vae_dtype
    if vae_dtype == "auto":  # fp16 VAEs overflow into NaN/black; diffusers marks those with force_upcast
        vae_dtype = "fp32" if dtype == "fp16" and getattr(pipe.vae.config, "force_upcast", False) else dtype
    if vae_dtype != dtype:
        vae_in_its_dtype(pipe, vae_dtype)
    run = Run(options, family, machine, dtype, vae_dtype, pipe=pipe, model_name=name,
              sampler=set_scheduler(pipe, family, options.sampling.scheduler))
    must_step_through(pipe.scheduler, options.sampling.scheduler, options.sampling.steps)
    mode, note = speed.compile_mode(speed_options.compile_mode, machine.device)
    run.speed = {"compile": mode if speed_options.compile else None,
                 "compile_vae": mode if speed_options.compile_vae else None,
                 "fuse_qkv": speed_options.fuse_qkv, "channels_last": speed_options.channels_last,
                 **speed.set_precision(machine.device, speed_options.tf32, speed_options.cudnn_benchmark)}
    if note and (speed_options.compile or speed_options.compile_vae):
        run.speed["note"] = note
    speed.apply(pipe, speed_options.fuse_qkv, speed_options.channels_last)
    preferred = None
    if choice.backend == routing.AUTO and choice.tune:
        run.tuning = tuning.load_or_tune(run, speed_options, options.work.batch_size, one_step, choice.quantized,
                                         choice.retune, on_progress)
        preferred = tuning.preferences(run.tuning)
    run.router = routing.route(pipe, routing.Router.for_request(
        choice.backend, machine, choice.fallback, choice.quantized, preferred))
    speed.compile(pipe, family, mode, denoiser=speed_options.compile, vae=speed_options.compile_vae)
    run.load_seconds = time.perf_counter() - t0
    return run


def wrap(pipe, options: Options, machine: hardware.Machine, name: str | None = None) -> Run:
    """A Run around a pipeline the caller built (the Python API): its device, dtypes and scheduler as they are,
    nothing routed yet."""
    options.validate()
    family = families.of_pipeline(pipe)
    options = with_defaults(options, lambda: family.default_guidance(type(pipe).__name__))
    denoiser = getattr(pipe, family.denoiser)
    return Run(options, family, machine, numerics.dtype_name(denoiser.dtype), numerics.dtype_name(pipe.vae.dtype),
               pipe=pipe, model_name=name or type(pipe).__name__, sampler=set_scheduler(pipe, family, "default"))


def vae_in_its_dtype(pipe, vae_dtype: str) -> None:
    """The VAE in another dtype than the denoiser: the pipeline decodes as always, and the latents are cast as they
    enter the VAE's first layer."""
    vae = pipe.vae.to(numerics.torch_dtype(vae_dtype))
    first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
    first.register_forward_pre_hook(lambda module, args: (args[0].to(vae.dtype), *args[1:]))


def one_step(run: Run, batch: int) -> None:
    """A one-step render of the first item at `batch`: enough to meet every attention shape of the run at that
    batch (see tuning.collect_shapes)."""
    render(run, work_items(run.options)[:1] * batch, steps=1)


def set_scheduler(pipe, family: families.Family, name: str) -> str:
    """Swap in the named scheduler of the pipeline's family (from the model's own config); return its A1111
    sampler name."""
    import diffusers

    schedulers = family.schedulers
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


def first_timestep_repeats(scheduler, steps: int) -> bool:
    """Whether `scheduler`'s first timestep at `steps` steps comes again. diffusers' schedulers find their first
    step by its timestep and take the second match where there are two (right for Heun, whose steps come in
    pairs), so a scheduler of one timestep per step then skips a step and runs past its end: IndexError or
    AssertionError at the last step. Seen with DPM++ 2M Karras on the shapes model's zero-terminal-SNR schedule
    from 21 steps on (Karras sigmas crowd at its top). False where it can't say without the pipeline's own
    arguments (Flux's dynamic shift needs the image's size)."""
    import copy

    scheduler = copy.deepcopy(scheduler)  # set_timesteps keeps state; the pipeline's own call sets it afresh
    try:
        scheduler.set_timesteps(steps)
    except (TypeError, ValueError):
        return False
    timesteps = scheduler.timesteps.tolist()
    return len(timesteps) == steps and timesteps.count(timesteps[0]) > 1


def must_step_through(scheduler, name: str, steps: int) -> None:
    """Refuse, before anything runs, a scheduler that would fail at its last step (`first_timestep_repeats`)."""
    if not first_timestep_repeats(scheduler, steps):
        return
    fewer = next((n for n in range(steps - 1, 0, -1) if not first_timestep_repeats(scheduler, n)), None)
    hint = f"; it runs at --steps {fewer} or fewer" if fewer else ""
    raise SdcliError(f"--scheduler {name} gives this model's noise schedule its first timestep twice in {steps} "
                     f"steps, and diffusers would step past its end: choose another --scheduler{hint}")


def generate(run: Run, items: list[Item] | None = None, on_step=None, on_image=None, skip=frozenset(),
             rank: int | None = None) -> Run:
    """Generate `items` (default: all of the run's work) in batches, saving each image under its item's
    stem as it finishes. on_step(step, latents) and on_image(result) report progress. `skip`: indices of items
    already on disk. A batch of only those is not run; in a batch with others they are made again but not saved,
    so that the others get the pixels of the same batch run in one go. A run that stops says so in one line,
    with what it kept and how to go on: Ctrl-C is Interrupted, any other failure RunFailed (`rank` names the
    process where there are several)."""
    items = work_items(run.options) if items is None else items
    size, folder = run.options.work.batch_size, run.options.work.output_dir
    who = "" if rank is None else f"rank {rank}: "
    kept_now = lambda: kept(run) + (f"; {resume_hint(run.options)}" if run.images else "")  # noqa: E731
    interrupt.on_force(lambda: who + kept_now())  # a Ctrl-C inside one long operation: images are whole on disk
    try:
        with devices.peak_memory(run.device) as peak:
            for start in range(0, len(items), size):
                batch = items[start:start + size]
                if all(item.index in skip for item in batch):
                    continue
                with timing.stopwatch(run.device) as watch:
                    images, problems = render(run, batch, on_step)
                seconds = watch.seconds / len(batch)
                run.seconds += seconds * len(batch)
                for item, image, problem in zip(batch, images, problems):
                    if item.index in skip:
                        continue
                    path = save_png(image, folder, item.stem, recipe(run, item))
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

    sampling, pipe = run.options.sampling, run.pipe
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in batch]  # same latents on any device
    last = {}

    def step_end(_pipe, step, _t, kwargs):
        last["latents"] = kwargs["latents"]
        if on_step:
            on_step(step, kwargs["latents"])
        return kwargs

    # both sides, always: diffusers' SD pipeline replaces a lone width (or height) with its default size
    width, height = run.size
    # a negative prompt only when there is one: pipelines differ in what they take for none (None, "")
    negative = {"negative_prompt": [sampling.negative_prompt] * len(batch)} if sampling.negative_prompt else {}
    with torch.inference_mode():
        images = pipe(
            prompt=[item.prompt for item in batch], **negative,
            num_inference_steps=steps or sampling.steps, guidance_scale=sampling.guidance, width=width, height=height,
            generator=generators, output_type="np", callback_on_step_end=step_end,
        ).images
        bad_latents = torch.isnan(last["latents"].flatten(1)).any(1).tolist()
    problems = []
    for bad, image in zip(bad_latents, images):
        if bad:
            problems.append(f"NaN in the latents: the {run.family.denoiser} overflowed in {run.dtype} or the attention kernel "
                            "failed; try --dtype bf16 (or fp32), or another --backend")
        elif np.isnan(image).any():
            problems.append(f"NaN after the VAE in {run.vae_dtype}: run it with --vae-dtype fp32")
        elif image.max() < 0.02:
            problems.append("black image: every pixel below 2%; try --vae-dtype fp32 or --dtype bf16")
        else:
            problems.append(None)
    return images, problems

