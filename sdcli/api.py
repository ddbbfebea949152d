"""sdcli's Python API, for a script, notebook or service; the `sdcli` commands are its first client.

    import sdcli
    pipe = sdcli.load("tiny")                  # or any diffusers pipeline of SD 1.x-3.5 or Flux.1
    plan = sdcli.route(pipe, backend="auto")   # attention routed per layer, every call counted
    image = pipe("a lighthouse").images[0]
    print(plan.served())                       # what actually ran, per backend and per layer
    sdcli.unroute(pipe)                        # attention calls go straight to diffusers again

    sdcli.compile(pipe, mode="reduce-overhead")   # torch.compile, counted outside the graph (CUDA graphs stay)

    sdcli.doctor()                             # what this machine can run, as `sdcli doctor --json`
    sdcli.compare(pipe, prompt="a lighthouse", seed=42)   # every backend against the most exact one
    sdcli.generate(["a lighthouse"], "tiny", steps=2, seed=1)   # images on disk, as `sdcli generate --json`
    sdcli.bench("tiny", batch_sizes=[1, 2], steps=2)          # the throughput experiment, as `sdcli bench --json`

`generate`, `compare` and `bench` take the options of their command by name (`steps=`, `backend=`, `fuse_qkv=`, ...:
sdcli.options) and return what the command's `--json` prints. The `sdcli` commands do nothing else: they parse,
call these functions, and draw the result (views.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sdcli import families, numerics
from sdcli.errors import RoutingError, SdcliError, plural
from sdcli.options import DEFAULT_MODEL

AUTO = "auto"
# What the commands' help and defaults say
BUILTIN_MODELS = [name for family in families.FAMILIES for name in family.builtins]
SIZE_STEPS = {family.name: family.size_multiple for family in families.FAMILIES}
EXACT_TOL, QUANTIZED_TOL = numerics.EXACT_TOL, numerics.QUANTIZED_TOL
REFERENCE = "sdpa-math"  # compare's reference: the most exact backend


class Plan:
    """What `route` put on a pipeline: the router, its layers, and the evidence of what served them."""

    def __init__(self, pipe, router):
        self.pipe = pipe
        self.router = router

    @property
    def layers(self) -> list:
        """One routing.Layer per attention call site (a module, or its n-th call in one forward, `name#n`): its
        shape, planned backend, the processors that ran it, and calls per backend."""
        return self.router.layers

    def served(self) -> dict:
        """Attention calls so far: {"backends": {backend: calls}, "layers": {layer: {backend: calls}},
        "processors": {layer: [processor classes that ran it]}, "not_routed": {layer: {why: forwards or calls}}}.
        A layer whose processor computes attention itself (e.g. diffusers' AttnProcessor after
        set_default_attn_processor) ran without a routed call: it is under "not_routed", never under "backends";
        a layer whose forward never ran has no processors."""
        layers = self.router.layers
        return {"backends": dict(self.router.served()),
                "layers": {layer.name: dict(layer.served()) for layer in layers},
                "processors": {layer.name: [*layer.processors] for layer in layers},
                "not_routed": {layer.name: dict(layer.not_routed) for layer in layers if layer.not_routed}}

    def reset(self) -> None:
        """Forget the calls so far (e.g. a warm-up's); the routes stay."""
        self.router.reset_counts()

    def to_json(self) -> dict:
        """Everything, as the `attention` part of `sdcli generate --json`."""
        return self.router.to_json()

    def __repr__(self) -> str:
        served = ", ".join(f"{b} {plural(n, 'call')}" for b, n in self.router.served().items()) or "no calls yet"
        return f"<sdcli.Plan {self.router.requested}: {plural(len(self.layers), 'layer')}; {served}>"


def device_of(pipe) -> str:
    """Where the pipeline's attention runs: its first model with attention ('cpu' or 'cuda:N')."""
    from sdcli import routing

    for model in routing.attention_models(pipe).values():
        weight = next(model.parameters(), None)
        if weight is not None:
            return str(weight.device)
    raise SdcliError(f"{type(pipe).__name__} has no model with diffusers attention modules to route")


@lru_cache(maxsize=None)
def machine(device: str):
    """This machine for `device` (a hardware.Machine), probed once per process and device (only that GPU is
    touched)."""
    from sdcli import devices, hardware

    return hardware.Machine(hardware.probe(only_gpu=devices.gpu_index(device)), device)


def load(model: str, device: str | None = None, dtype: str | None = None, loras: list[str] | None = None):
    """A diffusers pipeline for `model`, as `--model` takes it: a built-in (e.g. "tiny", offline), a Hub id (from
    the Hub cache), a diffusers folder, or a .safetensors/.ckpt checkpoint. `device`: cpu, cuda or cuda:N (default:
    a GPU if torch can use one); `dtype`: fp16, bf16 or fp32 (default: as `sdcli generate` picks); `loras`:
    "FILE[:SCALE]" each, loaded through diffusers (PEFT). Nothing is routed yet: that is `route`."""
    from sdcli import devices, hardware, lora, models, numerics

    devices.parse(device)
    if dtype is not None and dtype not in numerics.DTYPES:
        raise SdcliError(f"dtype must be one of {', '.join(numerics.DTYPES)}, not {dtype!r}")
    models.recognise(model)  # an unsupported model fails before its weights load
    report = hardware.probe(measure=dtype is None)  # the default dtype is the one measured to work
    device = devices.choose(report, device)
    pipe, _ = models.load(model, dtype or hardware.default_dtype(hardware.Machine(report, device)), device)
    lora.load(pipe, lora.parse_all(loras))
    return pipe


def route(pipe, backend: str = AUTO, fallback: bool = False, quantized: bool = False, device: str | None = None,
          tune: bool = True) -> Plan:
    """Route every attention call of every model in `pipe` (any diffusers pipeline, or one model: the denoiser, the
    VAE, ControlNets, priors, refiners) to `backend` and count each call. The attention call is routed whatever
    processor makes it, so diffusers features used before or after (IP-Adapter, LoRA, fused projections,
    set_attn_processor, torch.compile) keep working; a processor that computes attention itself is reported as not
    routed. Routing again replaces the plan.

    `backend`: "auto", or a backend name from `sdcli doctor`; a named backend must serve every layer unless
    `fallback` lets auto's order take the others. `quantized` lets auto use quantized kernels. With "auto",
    the first call at each new attention shape times every eligible backend at that shape (as `sdcli generate`
    does for its plan) and keeps the fastest within its accuracy bound, remembered for the process; `tune=False`
    takes the documented order instead. `device`: where to judge backends for (default: the pipeline's)."""
    from sdcli import backends, routing, tuning

    device = device or device_of(pipe)
    measure = (lambda shape, machine: tuning.fastest(shape, machine, quantized)) if backend == AUTO and tune else None
    router = routing.Router.for_request(backend, machine(device), fallback, quantized, measure=measure)
    if backend != AUTO:
        verdict = backends.get(backend).verdict(machine(device))
        if not verdict.usable:
            raise SdcliError(f"backend {backend!r} {verdict.refusal()} (sdcli.doctor() lists what can; "
                             'backend="auto" picks among them)')
    try:
        return Plan(pipe, routing.route(pipe, router))
    except RoutingError as exc:  # said with parameters, not options
        raise SdcliError(exc.said_to("api")) from None


def unroute(pipe) -> None:
    """Stop routing `pipe`: its attention calls go straight to diffusers and torch again, uncounted."""
    from sdcli import routing

    routing.unroute(pipe)


def compile(pipe, mode: str = "default", vae: bool = False) -> str:
    """torch.compile `pipe`'s denoiser (UNet or transformer), and with `vae` its VAE's decode, as `sdcli generate
    --compile` does: the first call at each new set of input shapes runs eagerly (routes are chosen there), the
    next ones run the compiled graph, and their attention calls are counted per forward outside it, so the graph
    writes to none of its inputs and `mode="reduce-overhead"` keeps its CUDA graphs. `mode`: default,
    reduce-overhead or max-autotune; without a CUDA GPU there are no CUDA graphs and the mode without them is
    used. Returns the mode used. Route before or after, as you like."""
    from sdcli import families, speed

    if mode not in speed.COMPILE_MODES:
        raise SdcliError(f"mode must be one of {', '.join(speed.COMPILE_MODES)}, not {mode!r}")
    used, _ = speed.compile_mode(mode, device_of(pipe))
    speed.compile(pipe, families.of_pipeline(pipe), used, denoiser=True, vae=vae)
    return used


def doctor(device: str | None = None, dtype: str | None = None, probe: bool = False, report: str | Path | None = None,
           on_progress=None, family: str | None = None) -> dict:
    """What this machine (or a saved `report`) can run: the same dict as `sdcli doctor --json`, with keys
    report, verdicts, probe (with `probe=True`: each usable backend measured at SD's shapes; with `family`,
    e.g. "sdxl", that family's shapes only), plans and skipped_cache_files (files in auto's plan cache that
    are not plans, and why)."""
    from sdcli import diagnosis

    return diagnosis.diagnose(Path(report) if report else None, probe, device, dtype, on_progress, family)


def compare(pipe, prompt: str = "a photo of an astronaut riding a horse on mars", seed: int = 42, steps: int = 30,
            guidance: float | None = None, negative_prompt: str | None = None, width: int | None = None,
            height: int | None = None, backends: list[str] | None = None, reference: str = REFERENCE,
            exact_tol: float | None = None, quantized_tol: float | None = None, output_dir: str | Path | None = None,
            on_progress=None, on_warning=None, **options) -> dict:
    """`sdcli compare`: the same prompt and seed through the reference and each backend (default: every one usable
    here); a row per backend with its verdict and evidence. `pipe`: a diffusers pipeline (its routing is put back as
    it was), or a model as `--model` takes it, loaded with `options` (scheduler=, loras=, dtype=, vae_dtype=,
    device=, threads=). With `output_dir`, also the grid PNG and the JSON report there (their paths under "grid" and
    "json"); without, the images as arrays under "images". on_progress(text) hears what it is doing."""
    from sdcli import comparison, pipeline
    from sdcli.options import Options

    given = {"exact_tol": exact_tol, "quantized_tol": quantized_tol}
    thresholds = comparison.Thresholds(**{k: v for k, v in given.items() if v is not None})  # checked there
    asked = dict(prompts=[prompt], negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width,
                 height=height, seed=seed, backend=reference, output_dir=None, **options)
    if isinstance(pipe, str):
        run_options = Options.make(pipe, **asked)
        use_threads(run_options, on_warning)
        if on_progress:
            on_progress(f"loading {pipe}")
        run = comparison.load(run_options, backends, reference)
    elif options:
        raise SdcliError(f"{', '.join(options)}: for a model to load, not for a pipeline given (it has its own)")
    else:
        run = pipeline.wrap(pipe, Options.make(**asked), machine(device_of(pipe)))
    result = comparison.compare(run, backends, reference, thresholds, on_progress)
    if output_dir is not None:
        return comparison.save(result, output_dir)
    images = result.pop("_images")
    return {**result, "images": images}


def generate(prompts: list[str], model: str = DEFAULT_MODEL, resume: bool = False, view=None, **options) -> dict:
    """`sdcli generate`: the images of `prompts` (each `num_images=` times, item n with seed `seed + n`) written to
    `output_dir=` with their recipe, `options` by the command's option names (steps=, backend=, ...). Returns what
    `--json` prints. With `resume`, the items already on disk are skipped (needs the first run's `seed`); under a
    launcher (torchrun, `accelerate launch`) each process makes its share and rank 0 writes manifest.jsonl.
    `view` shows it as it goes (views.GenerateView: loading, making, show, error, warning, interrupted); without
    one nothing is drawn. A run that stops raises Interrupted or RunFailed, saying what it kept; images that come out
    NaN or black raise BadImages after the run is reported (they are kept; `exc.summary` is the result)."""
    from sdcli import distributed, pipeline
    from sdcli.errors import BadImages, Said
    from sdcli.options import Options

    asked = Options.make(model, prompts=prompts, **options)
    if resume and asked.work.seed is None:
        raise SdcliError("--resume needs the --seed of the run it finishes (without one, seeds are random and "
                         "no image on disk can match)")
    resolved = pipeline.resolve(asked)  # bad input fails before the slow imports (--resume compares the defaults)
    view = view or Unseen()
    use_threads(resolved, view.warning)
    ranks = distributed.detect()
    if ranks.launched or resume:
        summary, code = distributed.generate_share(resolved, ranks, resume, view)
        if code:  # each rank has said what went wrong
            raise Said(code)
        return summary
    with view.loading() as on_progress:
        run = pipeline.prepare(resolved, on_progress=on_progress)
    items = pipeline.work_items(run.options)
    with view.making(len(items), resolved.sampling.steps) as (on_step, on_image):
        pipeline.generate(run, items, on_step, on_image)
    summary = run.to_json()
    view.show(summary)
    if summary["problems"]:
        raise BadImages(summary["problems"], summary)
    return summary


def bench(model: str = "sd15-arch", batch_sizes: list[int] = (1, 2, 4, 8, 16), repeats: int = 3,
          backends: list[str] | None = None, find_max: bool = True, max_batch: int = 256, micro: bool = True,
          output_dir: str | Path | None = None, on_progress=None, on_warning=None, **options) -> dict:
    """`sdcli bench`: images/s by batch size for stock diffusers, each backend (default: every exact one usable here)
    and auto, and with speed options (fuse_qkv=, channels_last=, compile=, compile_vae=) stock and auto with them;
    the largest batch that fits; with `micro`, every kernel alone at the model's shapes. `options` by the command's
    option names (steps=50 unless given). With `output_dir`, the JSON and plot are written there (their paths
    under "json" and "plot"), also when Ctrl-C cuts it short. on_progress(text, advance) hears each point."""
    from sdcli import benchmark
    from sdcli import interrupt
    from sdcli.options import Options

    if repeats < 1 or max_batch < 1:
        raise SdcliError("--repeats and --max-batch must be at least 1")
    batch_sizes = sorted(set(batch_sizes))
    if not batch_sizes or batch_sizes[0] < 1:
        raise SdcliError(f"--batch-sizes needs positive numbers, not {batch_sizes}")
    asked = Options.make(model, **{"prompts": ["a photo of an astronaut riding a horse on mars"], "steps": 50,
                                   "seed": 0, "backend": "sdpa", "output_dir": output_dir, **options})
    use_threads(asked, on_warning)

    def keep_on_force(sum_up):  # a Ctrl-C inside one long operation: save what was measured from the watcher
        if output_dir is not None:
            interrupt.on_force(lambda: benchmark.kept(benchmark.save(sum_up(), output_dir)))

    try:
        run = benchmark.load(asked, backends)
        result = benchmark.bench(run, asked.speed, batch_sizes, repeats, backends, find_max, max_batch, micro,
                                  on_progress, expose=keep_on_force)
    finally:
        interrupt.on_force(None)
    return benchmark.save(result, output_dir) if output_dir is not None else result


def use_threads(options, on_warning=None) -> None:
    """The options' CPU threads for torch, and a warning when a CPU run's threads would fight other processes for
    the cores (on_warning(text))."""
    from sdcli import hardware

    note = hardware.use_threads(options.placement.threads, options.placement.device)
    if note and on_warning:
        on_warning(note)


def watch_ctrl_c() -> None:
    """Let Ctrl-C stop a run within seconds even inside one long torch operation, keeping what it finished (a
    watcher thread, main thread only; the `sdcli` command does this). Without it, sdcli leaves signals alone."""
    from sdcli import interrupt

    interrupt.install()


class Unseen:
    """A generate run that nobody watches: it draws nothing (see views.GenerateView for one that does)."""

    quiet = True

    def loading(self, quiet=None):
        return _nothing_to(None)

    def making(self, images: int, steps: int, quiet=None):
        return _nothing_to((None, None))

    def show(self, summary: dict, quiet=None) -> None:
        pass

    def error(self, text: str) -> None:
        pass

    warning = interrupted = error


def _nothing_to(value):
    from contextlib import nullcontext

    return nullcontext(value)
