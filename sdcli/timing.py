"""Timing: one stopwatch for everything sdcli times (auto's plan, bench, compare, generate), and the
measurement of attention kernels at one shape.

On the CPU it is wall time. On a GPU work is queued, so the stopwatch first waits for the device's
earlier work, then brackets the block with CUDA events on the device's own stream (not whatever GPU
happens to be current) and waits for the end event: the block's queued kernels are counted, earlier
ones are not. A kernel alone is timed on the device's own clock (per_call): the GPU waits while the
host queues the calls, so the Python that launches a small kernel is not its time.

Measuring kernels at a shape: accuracy first, at batch 1, on two calls with different inputs (the layer's
real activations when a run captured them, and sampled ones of realistic magnitude), by the rule `sdcli
compare` uses (sdcli.numerics.judge). Then time, at the run's batch: a warm-up, then rounds in which every
backend in turn makes several back-to-back calls inside one stopwatch; a backend's time is the median of
its rounds. Interleaving spreads clock and thermal drift over all backends alike, and back-to-back calls
keep launch latency from deciding short kernels. Anything a backend raises, out-of-memory included, drops
that backend at that shape, never the measurement of the others.
"""

from __future__ import annotations

import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from sdcli import devices, numerics
from sdcli.errors import error_line

ROUNDS = 5
WARMUPS = 1     # then one more call, timed alone, sizes the rounds
MAX_CALLS = 50  # back-to-back calls per round, at most


@dataclass
class Stopwatch:
    seconds: float = 0.0


@contextmanager
def stopwatch(device: str):
    """`with stopwatch(device) as watch: ...`, then `watch.seconds`."""
    watch = Stopwatch()
    if not devices.is_cuda(device):
        t0 = time.perf_counter()
        yield watch
        watch.seconds = time.perf_counter() - t0
        return
    import torch

    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record(stream)
    yield watch
    end.record(stream)
    end.synchronize()
    watch.seconds = start.elapsed_time(end) / 1e3


# How long the GPU waits before the timed calls, per device: it grows until the host can queue every call in it.
_HOLD: dict[str, float] = {}
_CYCLES_PER_SECOND: dict[str, float] = {}


def per_call(fn, calls: int, device: str) -> float:
    """Seconds per call of `fn`, over `calls` back-to-back calls. On the CPU, wall time. On a GPU, the device's own
    time: a small kernel finishes before Python has launched the next, so events around the calls alone would time
    the Python that launches them (the GPU idles in between). So the GPU first waits (torch.cuda._sleep) while the
    host queues every call, and the events bracket only the calls; if the host took longer than the wait, the wait
    doubles and it runs again (4 tries; a kernel that waits for the host itself stays host-bound)."""
    if not devices.is_cuda(device):
        with stopwatch(device) as watch:
            for _ in range(calls):
                fn()
        return watch.seconds / calls
    import torch

    stream = torch.cuda.current_stream(device)
    hold = _HOLD.get(device, 1e-3)
    for _ in range(4):
        held, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        torch.cuda.synchronize(device)
        with torch.cuda.device(device):  # _sleep runs on the current device
            t0 = time.perf_counter()
            held.record(stream)
            torch.cuda._sleep(int(hold * _cycles_per_second(device)))
            start.record(stream)
            for _ in range(calls):
                fn()
            end.record(stream)
            queued = time.perf_counter() - t0
        end.synchronize()
        if held.elapsed_time(start) / 1e3 >= queued:  # every call was queued before the GPU reached the first
            _HOLD[device] = hold
            break
        hold = 2 * max(hold, queued)
    return start.elapsed_time(end) / 1e3 / calls


def _cycles_per_second(device: str) -> float:
    """The GPU's clock as torch.cuda._sleep counts it, measured once."""
    if device not in _CYCLES_PER_SECOND:
        import torch

        cycles = 10**6
        with torch.cuda.device(device), stopwatch(device) as watch:
            torch.cuda._sleep(cycles)
        _CYCLES_PER_SECOND[device] = cycles / max(watch.seconds, 1e-6)
    return _CYCLES_PER_SECOND[device]


def _dropped(row: dict, exc: BaseException) -> dict:
    devices.release_memory()  # an out-of-memory leaves the allocator's cache full
    return {**row, "ok": False, "error": error_line(exc)}


def measure(candidates: list, shape, device: str, batch: int = 1, activations: tuple | None = None,
            min_seconds: float = 0.05) -> list[dict]:
    """Every candidate backend at `shape`: accuracy (ok, why, ratio, ...) and median ms per call, TFLOP/s.
    `activations`: (q, k, v, mask) of one real call at this shape, batch 1, to judge accuracy on."""
    rows = {b.name: {"backend": b.name, "kind": b.kind, "shape": str(shape), "batch": batch} for b in candidates}
    with warnings.catch_warnings():  # flex warns on every eager call; its summary already says so
        warnings.simplefilter("ignore", UserWarning)
        alive = _judge(candidates, rows, shape, device, activations)
        times = _time(alive, rows, shape, batch, device, min_seconds)
    flops = 4 * batch * shape.heads * shape.q_len * shape.kv_len * shape.head_dim
    for name, t in times.items():
        seconds = statistics.median(t["rounds"])
        rows[name].update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, calls_timed=t["calls"])
    return list(rows.values())


def _judge(backends: list, rows: dict, shape, device: str, activations: tuple | None) -> list:
    """Judge every backend on the same two calls at batch 1; returns those that ran (within bound or not)."""
    try:
        checks = [activations or numerics.sampled_call(shape, device, seed=2), numerics.sampled_call(shape, device)]
        bases = [numerics.baseline(*call) for call in checks]  # the same for every backend: computed once
    except Exception as exc:  # not even the reference fits: no backend can be judged here
        for b in backends:
            rows[b.name] = _dropped(rows[b.name], exc)
        return []
    alive = []
    for b in backends:
        try:
            rows[b.name].update(numerics.judge(b.run, b.kind, checks, bases))
            alive.append(b)
        except Exception as exc:  # out of memory too: the backend is not viable at this shape
            rows[b.name] = _dropped(rows[b.name], exc)
    return alive


def _time(backends: list, rows: dict, shape, batch: int, device: str, min_seconds: float) -> dict:
    """Warm-ups, then ROUNDS rounds of back-to-back calls per backend, interleaved. {name: {rounds, calls}}."""
    import torch

    try:
        q, k, v, _ = numerics.sampled_call(shape, device, batch, seed=0)
    except Exception as exc:
        if not devices.out_of_memory(exc):
            raise
        for b in backends:
            rows[b.name] = _dropped(rows[b.name], exc)
        return {}

    seconds = lambda fn, calls: per_call(fn, calls, device)  # noqa: E731
    calls, timed = {}, {}
    with torch.inference_mode():
        for b in list(backends):
            fn = lambda b=b: b.run(q, k, v)
            try:
                for _ in range(WARMUPS):
                    fn()
                once = seconds(fn, 1)
                calls[b.name] = max(1, min(MAX_CALLS, round(min_seconds / ROUNDS / max(once, 1e-7))))
                timed[b.name] = fn
            except Exception as exc:
                rows[b.name] = _dropped(rows[b.name], exc)
        result = {name: {"rounds": [], "calls": 0} for name in timed}
        for _ in range(ROUNDS):
            for name, fn in list(timed.items()):
                try:
                    result[name]["rounds"].append(seconds(fn, calls[name]))
                    result[name]["calls"] += calls[name]
                except Exception as exc:
                    rows[name] = _dropped(rows[name], exc)
                    del timed[name], result[name]
    return result
