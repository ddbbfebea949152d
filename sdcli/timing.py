"""Timing: one stopwatch for everything sdcli times (auto's plan, bench, compare, generate).

On the CPU it is wall time. On a GPU work is queued, so the stopwatch first waits for the device's
earlier work, then brackets the block with CUDA events on the device's own stream (not whatever GPU
happens to be current) and waits for the end event: the block's queued kernels are counted, earlier
ones are not.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from sdcli import error_line, numerics
from sdcli.backends import Backend, Shape


@dataclass
class Stopwatch:
    seconds: float = 0.0


@contextmanager
def stopwatch(device: str):
    """`with stopwatch(device) as watch: ...`, then `watch.seconds`."""
    watch = Stopwatch()
    if not str(device).startswith("cuda"):
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


def measure(backend: Backend, shape: Shape, device: str = "cpu", repeats: int = 5, batch: int = 1,
            min_seconds: float = 0.05) -> dict:
    """Run one backend at one shape on random inputs: accuracy against exact attention, median time, TFLOP/s.
    Repeats until `min_seconds` of work or 20× `repeats` calls, so tiny shapes are not timed on noise."""
    import torch

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, n, shape.heads, shape.head_dim, generator=gen).to(device, numerics.torch_dtype(shape.dtype))
               for n in (shape.q_len, shape.kv_len, shape.kv_len))
    times = []
    try:
        with warnings.catch_warnings():  # flex warns on every eager call; its summary already says so
            warnings.simplefilter("ignore", UserWarning)
            out = backend.run(q, k, v)  # not timed: kernel loading, autotuning (the stopwatch waits for it)
            while len(times) < repeats or (sum(times) < min_seconds and len(times) < 20 * repeats):
                with stopwatch(device) as watch:
                    backend.run(q, k, v)
                times.append(watch.seconds)
    except Exception as exc:  # out of memory too: the backend is not viable at this shape
        del q, k, v
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return {"backend": backend.name, "kind": backend.kind, "shape": str(shape), "batch": batch, "ok": False,
                "error": error_line(exc)}
    seconds = sorted(times)[len(times) // 2]
    flops = 4 * batch * shape.heads * shape.q_len * shape.kv_len * shape.head_dim
    acc = numerics.accuracy(out, q, k, v)
    return {
        "backend": backend.name, "kind": backend.kind, "shape": str(shape), "batch": batch,
        "ok": numerics.within_bound(backend.kind, acc), **acc,
        "ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "calls_timed": len(times),
    }
