"""`sdcli bench`: the throughput experiment behind sdcli.

Whole-pipeline images per second (text encoders, every denoising step with the model's guidance,
VAE decode) by batch size, for stock diffusers, for each backend, for measured `auto`, and, with speed
options, for stock diffusers and `auto` both with those options; seconds per image at batch 1; peak
memory; the largest batch that fits, found by doubling and bisection, recovering from out-of-memory;
and the attention kernels timed alone at the model's real shapes. Warm-up first, CUDA-synchronised
timing, median of repeats. Each row is compared with stock diffusers under the same options, so the
attention choice and the speed options each get their own speed-up.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

from sdcli import backends, devices, hardware, pipeline, routing, speed, timing, tuning
from sdcli.errors import plural
from sdcli.images import write_new
from sdcli.options import Options, Speed

STOCK = "diffusers"
OPTIONS = ("fuse-qkv", "channels-last", "compile", "compile-vae")  # the speed options a row can have, in order


@dataclass
class Config:
    """One line of the plot: how attention is served, and which speed options are on."""

    name: str
    backend: str | None  # None: stock diffusers, its own processors, nothing routed
    options: tuple[str, ...] = ()  # from OPTIONS

    @property
    def compiled(self) -> bool:
        return "compile" in self.options or "compile-vae" in self.options

    @property
    def baseline(self) -> str:
        """The stock row with the same options: what this row's speed-up is measured against."""
        return "+".join((STOCK, *self.options))


def choose_configs(machine: hardware.Machine, names: list[str] | None, options: tuple[str, ...]) -> list[Config]:
    """Stock diffusers, auto, then each named backend (default: every exact one usable here); with speed options
    also stock diffusers and auto with them. In order of value, so that a bench cut short has the answer to its
    first question (auto against stock): the single backends after them (fastest first, see fastest_first), and the
    option rows last, since fusing and compiling change the model."""
    if names is None:
        names = [b.name for b in backends.usable_here(machine, quantized=False, in_auto_only=True)]
    configs = [Config(STOCK, None), Config("auto", "auto")] + [Config(n, n) for n in names if n != routing.AUTO]
    if options:
        configs += [Config("+".join((STOCK, *options)), None, options),
                    Config("+".join(("auto", *options)), "auto", options)]
    return configs


def fastest_first(configs: list[Config], attention: list[dict] | None) -> list[Config]:
    """The single-backend rows in the order of the micro-benchmark: the least total time over the model's attention
    shapes first (where a backend did not run or broke its bound, the slowest time there counts). Stock, auto and
    the option rows keep their places."""
    if not attention:
        return configs
    total: dict[str, float] = {}
    for entry in attention:
        ms = {m["backend"]: m["ms"] for m in entry["measurements"] if m.get("ok") and "ms" in m}
        for c in configs:
            total[c.name] = total.get(c.name, 0.0) + ms.get(c.backend, max(ms.values(), default=0.0))
    single = [c for c in configs if c.backend not in (None, routing.AUTO) and not c.options]
    ranked = iter(sorted(single, key=lambda c: total[c.name]))
    return [next(ranked) if c in single else c for c in configs]


def largest_batch(fits, limit: int) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch in 1..limit for which fits(batch) is True: doubling, then bisection.
    Returns it (0 if not even 1 fits) and every (batch, fitted) tried."""
    tried = []

    def tried_at(b: int) -> bool:
        ok = fits(b)
        tried.append((b, ok))
        return ok

    good, bad, b = 0, None, 1
    while b <= limit:  # double until something does not fit
        if not tried_at(b):
            bad = b
            break
        good, b = b, b * 2
    if bad is None and good < limit:  # every doubling fitted: the limit itself is the last candidate
        if tried_at(limit):
            return limit, tried
        bad = limit
    while bad is not None and bad - good > 1:  # bisect between what fitted and what did not
        mid = (good + bad) // 2
        if tried_at(mid):
            good = mid
        else:
            bad = mid
    return good, tried


@dataclass
class Runner:
    """Holds the loaded pipeline and switches it between configurations."""

    run: pipeline.Run
    repeats: int
    on_progress: object = None
    applied: set = field(default_factory=set)
    compile_mode: str = "default"  # as asked for (sdcli.speed.compile_mode says what runs)
    routed_for: tuple | None = ()  # (backend, plan) the processors now serve; None: stock; (): not known

    def speed_of(self, config: Config) -> Speed:
        """The speed options of `config`'s row, as its plan is keyed: the run's TF32 and autotuner, its own options."""
        return replace(self.run.options.speed, fuse_qkv="fuse-qkv" in config.options,
                       channels_last="channels-last" in config.options, compile="compile" in config.options,
                       compile_vae="compile-vae" in config.options,
                       compile_mode=self.compile_mode if config.compiled else "default")

    def say(self, text: str, advance: int = 0) -> None:
        if self.on_progress:
            self.on_progress(text, advance)

    def use(self, config: Config, batch: int, tune: bool = True) -> routing.Router | None:
        """Route (or un-route) the pipeline for `config` at `batch`; auto measures or reads its plan for `batch`
        (with tune=False it keeps the plan it has: the batch search needs memory, not speed). The processors
        stay as they are while the config and its plan do: a compiled model then keeps its graphs."""
        run, options = self.run, self.speed_of(config)
        new = {"fuse-qkv", "channels-last"} & set(config.options) - self.applied
        speed.apply(run.pipe, "fuse-qkv" in new, "channels-last" in new)
        if "fuse-qkv" in new:
            self.routed_for = ()  # diffusers put its own fused processors in
        self.applied |= new
        preferred = None
        if config.backend == routing.AUTO:
            if tune or run.tuning is None:
                run.tuning = tuning.load_or_tune(run, options, batch, pipeline.one_step,
                                                 on_progress=lambda t: self.say(f"auto's plan: {t}"))
                if not run.tuning["cached"]:
                    self.routed_for = ()  # measuring routed the model for itself
            preferred = tuning.preferences(run.tuning)
        wanted = None if config.backend is None else (config.backend, preferred)
        if wanted != self.routed_for:
            if config.backend is None:
                routing.unroute(run.pipe)
                run.router = None
            else:
                run.router = routing.route(run.pipe, routing.Router.for_request(
                    config.backend, run.machine, fallback=True, preferred=preferred))
            self.routed_for = wanted
        compile_now = {"compile", "compile-vae"} & set(config.options) - self.applied
        if compile_now:
            speed.compile(run.pipe, run.family, speed.compile_mode(options.compile_mode, run.device)[0],
                          denoiser="compile" in compile_now, vae="compile-vae" in compile_now)
            self.applied |= compile_now
        return run.router

    def render(self, batch: int, steps: int | None = None) -> float:
        items = pipeline.work_items(self.run.options)[:1] * batch
        with timing.stopwatch(self.run.device) as watch:
            pipeline.render(self.run, items, steps=steps)
        return watch.seconds

    def point(self, config: Config, batch: int) -> dict:
        """Throughput of `config` at `batch`: a short warm-up, then the median of `repeats` full runs."""
        try:
            router = self.use(config, batch)
            # warm-up: kernel loading, autotuning; compiled, a forward per shape runs eagerly, the next compiles,
            # and with CUDA graphs the one after records: three one-step renders reach the steady state
            for _ in range(3 if config.compiled else 1):
                self.render(batch, steps=1 if config.compiled else 2)
            if router:
                router.reset_counts()
            with devices.peak_memory(self.run.device) as peak:  # CUDA graphs' pools too
                times = [self.render(batch) for _ in range(self.repeats)]
        except Exception as exc:
            if not devices.recovered(exc):
                raise
            return {"batch": batch, "oom": True}
        seconds = statistics.median(times)
        point = {
            "batch": batch, "oom": False, "seconds": seconds, "times": times,
            "images_per_s": batch / seconds, "s_per_image": seconds / batch, "peak_gb": peak.gb,
            "served": dict(router.served()) if router else None,  # stock diffusers: its own processors, uncounted
        }
        if config.backend == routing.AUTO:
            point["plan"] = {"path": self.run.tuning["path"], "cached": self.run.tuning["cached"]}
        return point

    def fits(self, config: Config, batch: int) -> bool:
        """Does one denoising step plus the decode fit at `batch`? Out-of-memory means no, not a crash."""
        self.say(f"{config.name}: does batch {batch} fit?")
        try:
            self.use(config, batch, tune=False)
            self.render(batch, steps=1)
            return True
        except Exception as exc:
            if not devices.recovered(exc):
                raise
            return False


def load(options: Options, names: list[str] | None = None, report: dict | None = None) -> pipeline.Run:
    """The options' model, loaded plainly for bench: each configuration routes for itself and turns its own speed
    options on (bench then gets the options asked for). Bad options, unknown `names` and names that can't run
    here at all fail first, with doctor's fix."""
    options = pipeline.resolve(options)
    for name in names or []:
        backends.get(name)  # unknown names fail before anything loads
    machine = pipeline.machine_for(options, report)
    for name in names or []:
        pipeline.check_runs_here(name, machine, "--backends")
    plain = replace(options, attention=replace(options.attention, backend="sdpa", tune=False),
                    speed=replace(options.speed, fuse_qkv=False, channels_last=False, compile=False, compile_vae=False,
                                  compile_mode="default"))
    return pipeline.prepare(plain, machine, judged=True)  # auto's plans and the kernel table judge kernels


def bench(run: pipeline.Run, speed_options: Speed, batch_sizes: list[int], repeats: int = 3,
          names: list[str] | None = None, find_max: bool = True, max_batch: int = 256, micro: bool = True,
          on_progress=None, expose=None) -> dict:
    """Every configuration at every batch size on the run's pipeline, the largest batch that fits, and (with
    `micro`) every backend alone at the model's attention shapes; then the speed-ups that tell the attention
    choice and the speed options apart (see speedups). The rows with options have `speed_options`' fuse_qkv,
    channels_last, compile and compile_vae (in its compile_mode); TF32 and cuDNN's autotuner are the run's, for
    every row alike. `expose(sum_up)`, if given, receives a function that returns the result so far, summed up
    as if interrupted now (for a Ctrl-C that can't wait for the main thread)."""
    import torch

    options = tuple(o for o, on in zip(OPTIONS, (speed_options.fuse_qkv, speed_options.channels_last,
                                                 speed_options.compile, speed_options.compile_vae)) if on)
    sampling, machine = run.options.sampling, run.machine
    configs = choose_configs(machine, names, options)
    runner = Runner(run, repeats, on_progress, compile_mode=speed_options.compile_mode)
    compiles = "compile" in options or "compile-vae" in options
    mode, note = speed.compile_mode(speed_options.compile_mode, run.device)
    result = {
        "model": run.model_name, "device": run.device, "gpu": machine.gpu_label,
        "dtype": run.dtype, "vae_dtype": run.vae_dtype, "steps": sampling.steps, "guidance": sampling.guidance,
        "guidance_type": run.family.guidance, "width": run.size[0], "height": run.size[1],
        "repeats": repeats, "batch_sizes": batch_sizes, "versions": {k: v.get("version") for k, v in
                                                                    run.report.get("packages", {}).items()},
        # every row: TF32 and cuDNN's autotuner; the rows with options: those, compiled in this mode
        "speed": {"tf32": run.speed.get("tf32"), "cudnn_benchmark": run.speed.get("cudnn_benchmark"),
                  "options": list(options), "compile_mode": mode if compiles else None,
                  **({"note": note} if note and compiles else {})},
        "configs": [],
        # compile time is paid once and is not throughput: say where it went
        "timing": "each point is the median of timed runs after an untimed warm-up (a 2-step render; compiled: "
                  "three 1-step renders, eager, compiling, recording CUDA graphs), and each kernel alone is judged "
                  "on two calls at batch 1, then timed (median of 5 rounds of back-to-back calls, kernels "
                  "interleaved) after an untimed call; kernels that compile (flex-compiled: once per shape; "
                  "flash-attn-4: at first use) compile there, so compile time is in none of these numbers",
    }

    def sum_up(interrupted: bool) -> dict:
        """The result so far: each row's speed-ups and the summary (a copy, so it can be made at any time)."""
        done = {**result, "configs": list(result["configs"])}
        if interrupted:
            done["interrupted"] = {"rows_done": len(done["configs"]), "rows_planned": len(configs)}
        rows = {row["name"]: row for row in done["configs"]}
        for row in done["configs"]:
            for key, base in (("speedup_vs_diffusers", STOCK), ("speedup_vs_baseline", row["baseline"])):
                baseline = rows.get(base)
                if row["best"] and baseline and baseline["best"]:
                    row[key] = row["best"]["images_per_s"] / baseline["best"]["images_per_s"]
        done["summary"] = speedups(done, options)
        return done

    if expose:
        expose(lambda: sum_up(interrupted=True))
    try:
        if micro:  # first: the compiled configurations come last and would have to recompile for it
            runner.say("attention kernels at the model's shapes")
            shapes, activations = tuning.collect_shapes(run, pipeline.one_step, batch=1)
            result["attention"] = tuning.measure_shapes(shapes, machine, quantized=True, everything=True,
                                                        on_progress=lambda t: runner.say(f"kernels: {t}"),
                                                        activations=activations)
            configs = fastest_first(configs, result["attention"])
        # a compiled model gets at most one graph per (routing, batch size); dynamo's default limit of 8 per
        # function would silently send longer batch lists back to eager
        with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(batch_sizes) + 2)):
            for config in configs:
                result["configs"].append(measure_config(runner, config, batch_sizes, find_max, max_batch))
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: the rows measured so far are the user's
        return sum_up(interrupted=True)
    return sum_up(interrupted=False)


def guidance_label(result: dict) -> str:
    """CFG runs the denoiser on two batches per step (in one call); distilled guidance (Flux) on one."""
    name = "distilled guidance" if result["guidance_type"] == "distilled" else "CFG"
    return f"{name} {result['guidance']:g}"


def measure_config(runner: Runner, config: Config, batch_sizes: list[int], find_max: bool, max_batch: int) -> dict:
    points = []
    for batch in batch_sizes:
        runner.say(f"{config.name}: batch {batch}")
        point = runner.point(config, batch)
        points.append(point)
        runner.say(f"{config.name}: batch {batch}", advance=1)
        if point["oom"]:
            break  # larger batches won't fit either
    row = {"name": config.name, "backend": config.backend, "options": list(config.options),
           "baseline": config.baseline, "points": points}
    done = [p for p in points if not p["oom"]]
    best = max(done, key=lambda p: p["images_per_s"], default=None)
    row["best"] = {"batch": best["batch"], "images_per_s": best["images_per_s"]} if best else None
    row["s_per_image_batch1"] = next((p["s_per_image"] for p in done if p["batch"] == 1), None)
    if find_max and not config.compiled:  # compiling per batch size to search would take long: searched uncompiled
        row["largest_batch"], row["search"] = largest_batch(lambda b: runner.fits(config, b), max_batch)
    return row


def speedups(result: dict, options: tuple[str, ...]) -> list[dict]:
    """The speed-ups that answer the questions, each between two rows at their best batch size: what the
    attention choice buys (auto over stock, both without options and both with the same options), what the
    options buy (stock with them over stock without), and the two together."""
    rows = {row["name"]: row for row in result["configs"]}
    stock, auto = STOCK, "auto"
    pairs = [("attention choice", auto, stock)]
    if options:
        stock_opt, auto_opt = "+".join((stock, *options)), "+".join((auto, *options))
        pairs += [("attention choice, with the options", auto_opt, stock_opt),
                  ("speed options alone", stock_opt, stock), ("both", auto_opt, stock)]
    out = []
    for what, faster, base in pairs:
        a, b = (rows[name]["best"] if name in rows else None for name in (faster, base))  # rows of a cut-short run
        out.append({"what": what, "row": faster, "against": base,
                    "speedup": a["images_per_s"] / b["images_per_s"] if a and b else None})
    return out


def plot(result: dict, path) -> None:
    """Images/s against batch size, one line per configuration: stock diffusers dashed, rows with the speed
    options with square markers; the largest batch that fits is in the legend, the key speed-ups in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for row in result["configs"]:
        done = [p for p in row["points"] if not p["oom"]]
        if not done:
            continue
        style = "--" if row["backend"] is None else "-"
        label = row["name"] + (f" (max batch {row['largest_batch']})" if row.get("largest_batch") else "")
        ax.plot([p["batch"] for p in done], [p["images_per_s"] for p in done], style,
                marker="s" if row["options"] else "o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["batch_sizes"], [str(b) for b in result["batch_sizes"]])
    ax.minorticks_off()
    ax.set_xlabel("batch size (images per pipeline call)")
    ax.set_ylabel("images / s (whole pipeline)")
    gains = "\n".join(f"{s['what']}: {s['row']} / {s['against']} ×{s['speedup']:.2f}"
                      for s in result["summary"] if s["speedup"])
    ax.set_title(f"{result['model']} {result['width']}x{result['height']}, {result['steps']} steps, "
                 f"{guidance_label(result)}, {result['dtype']}, {result['gpu']}\n{gains}", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def kept(result: dict) -> str:
    """What an interrupted bench kept, in words."""
    cut = result["interrupted"]
    done = f"{cut['rows_done']} of {plural(cut['rows_planned'], 'configuration')} measured"
    if not result.get("json"):
        return f"{done}: nothing to keep"
    return f"{done}, kept in {result['json']}" + (f" and {result['plot']}" if result.get("plot") else
                                                   " (no plot: no configuration finished a point)")


def save(result: dict, folder) -> dict:
    """The JSON and the plot, under new names. No plot without a measured point (it would be empty), and nothing
    at all when nothing was measured."""
    import json
    from pathlib import Path

    folder = Path(folder)
    stem = f"bench-{result['model'].replace('/', '_')}-{result['dtype']}"
    measured = any(not p["oom"] for row in result["configs"] for p in row["points"])
    result["plot"] = str(write_new(folder, stem, ".png", lambda p: plot(result, p))) if measured else None
    if not measured and not result.get("attention"):  # interrupted before anything was measured: nothing to keep
        result["json"] = None
        return result
    result["json"] = str(write_new(folder, stem, ".json",
                                   lambda p: p.write_text(json.dumps(result, indent=2, default=str))))
    return result
