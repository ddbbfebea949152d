"""Host time that routing adds per attention call, against diffusers' stock AttnProcessor2_0.

One diffusers `Attention` module on tensors so small that the kernel costs next to nothing, one thread:
what is left is Python and dispatch. Every backend that runs through diffusers' dispatcher and is usable
here gets a row. A backend that is one of SDPA's kernels is compared with stock running that same kernel
(SDPA held to it for the whole timing, so stock pays no switch per call); the others with plain stock.
Stock runs as in a process without sdcli (torch's own SDPA, no pass-through in front of it); routed, the module's
forward is sdcli's and its processor's SDPA call goes through the pass-through to the router.
Short rounds (~2 ms) alternate between stock and routed, so both see the same machine; the figure
is each one's best round, per call (the round least disturbed by other work). On the CPU a round is timed by
this thread's own CPU time (time.thread_time), so other processes on a busy machine don't count; on a GPU by
the wall clock around synchronised rounds.

    python scripts/attention_overhead.py [--device cuda] [--json]
"""

import argparse
import json
import time
import warnings
from contextlib import nullcontext


def round_us(attn, routed: bool, hidden, calls: int, sync, clock, kernel=None) -> float:
    """One round of `calls` calls, µs per call: routed (sdcli's pass-throughs in place) or stock (torch's own SDPA);
    SDPA held to `kernel` if given."""
    from torch.nn.attention import sdpa_kernel

    from sdcli import routing

    (routing.install_pass_throughs if routed else routing.remove_pass_throughs)()
    with nullcontext() if kernel is None else sdpa_kernel(kernel):
        sync()
        t0 = clock()
        for _ in range(calls):
            attn(hidden)
        sync()
        return (clock() - t0) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16; default: fp32 on the CPU, fp16 on a GPU")
    parser.add_argument("--calls", type=int, default=50, help="calls per round (fewer for slow kernels)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from torch.nn.attention import SDPBackend

    from sdcli import backends, hardware, numerics, routing
    from sdcli.errors import RoutingError

    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    torch.set_num_threads(1)
    dtype_name = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    dtype = numerics.torch_dtype(dtype_name)
    sync = (lambda: torch.cuda.synchronize(args.device)) if args.device.startswith("cuda") else (lambda: None)
    clock = time.perf_counter if args.device.startswith("cuda") else time.thread_time
    machine = hardware.Machine(hardware.probe(), args.device)
    stock = Attention(query_dim=32, heads=2, dim_head=16, processor=AttnProcessor2_0()).to(args.device, dtype)
    attn = Attention(query_dim=32, heads=2, dim_head=16, processor=AttnProcessor2_0()).to(args.device, dtype)
    attn.load_state_dict(stock.state_dict())
    hidden = torch.randn(1, 16, 32, device=args.device, dtype=dtype)
    shape = backends.Shape(2, 16, 16, 16, dtype_name)

    rows = []
    with torch.inference_mode():  # as the pipeline runs
        for backend in backends.all_backends():
            if backend.diffusers_name is None or not backend.verdict(machine, shape).usable:
                continue
            kernel = routing.SDPA_KERNELS.get(backend.diffusers_name)
            kernel = None if kernel is None else SDPBackend(kernel)
            router = routing.route(attn, routing.Router([backend], machine, strict=True, requested=backend.name))
            try:
                round_us(attn, True, hidden, 1, sync, clock)  # the first call chooses the route
            except RoutingError as exc:
                rows.append({"backend": backend.name, "error": str(exc)})
                continue
            calls = max(10, min(args.calls, int(2e3 / round_us(attn, True, hidden, 3, sync, clock))))  # ~2 ms a round
            times = {"stock": [], "routed": []}
            for _ in range(args.rounds):
                times["stock"].append(round_us(stock, False, hidden, calls, sync, clock, kernel))
                times["routed"].append(round_us(attn, True, hidden, calls, sync, clock))
            routing.unroute(attn)
            base, us = min(times["stock"]), min(times["routed"])
            rows.append({"backend": backend.name, "us_per_call": round(us, 2), "stock_us_per_call": round(base, 2),
                         "stock_kernel": kernel.name.lower() if kernel else "sdpa's choice",
                         "same_kernel": kernel is not None or backend.diffusers_name == "native",
                         "overhead_us": round(us - base, 2), "calls_per_round": calls,
                         "calls_counted": sum(router.served().values())})
    result = {"device": machine.device, "gpu": machine.gpu_label, "dtype": dtype_name, "threads": 1,
              "torch": torch.__version__, "rounds": args.rounds, "backends": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['gpu']}, {dtype_name}, 1 thread, torch {torch.__version__}: µs per attention call, "
          f"best of {args.rounds} rounds")
    print(f"  {'backend':<16} {'routed':>9} {'stock':>9} {'added':>8}   stock's kernel")
    for r in rows:
        if "error" in r:
            print(f"  {r['backend']:<16} {r['error']}")
            continue
        other = "" if r["same_kernel"] else "  (not the routed kernel: the difference is the kernel's)"
        print(f"  {r['backend']:<16} {r['us_per_call']:9.2f} {r['stock_us_per_call']:9.2f} {r['overhead_us']:+8.2f}"
              f"   {r['stock_kernel']}{other}")


if __name__ == "__main__":
    main()
