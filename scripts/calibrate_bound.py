"""Calibrate the bound for exact kernels: correct kernels against planted faults, per dtype and SD shape.

For every attention shape of SD 1.x, 2.x, XL and the VAE (sequences capped at --max-seq), in fp32, fp16 and
bf16, on inputs whose logits spread like a trained model's (up to about ±10, sdcli.numerics.sample_inputs)
and on unit normals (flatter), it runs every exact backend usable here and every planted fault
(tests/planted_faults.py) and prints each one's error in units of rounding (sdcli.numerics.baseline) as a
markdown table: the table in docs/bound.md.

    python scripts/calibrate_bound.py                  # CPU: sequences capped at 1024 (about 3 minutes)
    python scripts/calibrate_bound.py --max-seq 0 --device cuda:0   # a GPU: the real lengths
"""

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def planted_faults() -> list:
    spec = importlib.util.spec_from_file_location("planted_faults", ROOT / "tests" / "planted_faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.backends


def main() -> None:
    import torch

    from sdcli import backends, hardware, numerics
    from sdcli.diagnosis import REFERENCE_SHAPES
    from sdcli.backends import Shape
    from sdcli.hardware import Machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-seq", type=int, default=1024, help="cap sequence lengths (0: none)")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # eager flex warns on every call

    machine = Machine(hardware.probe(measure=False), args.device)
    faults = planted_faults()
    cap = args.max_seq or None
    shapes = []
    for family in REFERENCE_SHAPES.values():
        for heads, head_dim, q_len, kv_len in family:
            shape = (heads, head_dim, min(q_len, cap or q_len), min(kv_len, cap or kv_len))
            if shape not in shapes:
                shapes.append(shape)
    inputs = {"realistic": numerics.LOGIT_STD, "unit normal": 1.0}

    print(f"torch {torch.__version__}, {machine.gpu_label}, sequences capped at {cap or 'nothing'}\n")
    names, seen = None, set()
    for dtype in args.dtypes.split(","):
        for heads, head_dim, q_len, kv_len in shapes:
            shape = Shape(heads, head_dim, q_len, kv_len, dtype)
            correct = backends.usable_here(machine, shape, quantized=False)
            for label, logit_std in inputs.items():
                q, k, v = numerics.sample_inputs(heads, head_dim, q_len, kv_len, dtype, args.device, seed=1,
                                                 logit_std=logit_std)
                with torch.inference_mode():
                    base = numerics.baseline(q, k, v)
                    ratios = {b.name: numerics.accuracy(b.run(q, k, v), q, k, v, base=base)["ratio"]
                              for b in correct + faults}
                    logits = (q.float().transpose(1, 2) @ k.float().permute(0, 2, 3, 1)) * head_dim ** -0.5
                if names is None:
                    names = [f.name for f in faults]
                    print("| dtype | shape | inputs | max logit | rounding | correct kernels (worst) | "
                          + " | ".join(names) + " |")
                    print("| --- " * (6 + len(names)) + "|")
                ok = {b.name: ratios[b.name] for b in correct}
                seen |= set(ok)
                worst = max(ok, key=ok.get)
                print(f"| {dtype} | {heads}×{head_dim} q{q_len}·kv{kv_len} | {label} | {logits.abs().max():.1f} "
                      f"| {base[1]:.2e} | {min(ok.values()):.2f}–{ok[worst]:.2f} ({worst}) | "
                      + " | ".join(f"{ratios[n]:.3g}" for n in names) + " |", flush=True)
    print(f"\ncorrect kernels: {', '.join(sorted(seen))}")


if __name__ == "__main__":
    sys.exit(main())
