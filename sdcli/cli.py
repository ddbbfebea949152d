"""The `sdcli` command: thin typer commands over the Python API.

Only typer and rich load at start-up; torch and diffusers load inside the commands that need them,
so `sdcli --help` and completions stay fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from sdcli import SdcliError, __version__

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


class Group(TyperGroup):
    """Bad input is one line on stderr and a non-zero exit, never a traceback (SDCLI_DEBUG=1 shows it)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
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


def load_report(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise SdcliError(f"cannot read report {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdcliError(f"{path} is not a JSON report ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("report"), dict):  # a saved `sdcli doctor --json`
        data = data["report"]
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("sdcli.report/"):
        raise SdcliError(f"{path} is not an sdcli report (make one with: sdcli doctor --json > report.json)")
    return data


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
    from sdcli import backends, hardware

    if dtype and dtype not in backends.DTYPES:
        raise SdcliError(f"--dtype must be one of {', '.join(backends.DTYPES)}, not {dtype!r}")
    if device and not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise SdcliError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    if report and probe:
        raise SdcliError("--probe runs kernels on this machine; it can't be combined with --report")
    data = load_report(report) if report else hardware.probe()
    verdicts = backends.assess(data, device, dtype)
    probed = None
    if probe:
        probed = probe_backends(data, verdicts, quiet=json_out)
    if json_out:
        emit_json({"report": data, "verdicts": verdicts, "probe": probed})
    else:
        print_doctor(data, verdicts, probed)


CPU_PROBE_SEQ = 1024


def probe_backends(report: dict, verdicts: dict, quiet: bool) -> list:
    from rich.progress import Progress

    from sdcli import backends

    # On a CPU the full 4096-9216-long sequences take minutes; the heads and head dims are what differ.
    cap = None if verdicts["device"].startswith("cuda") else CPU_PROBE_SEQ
    shapes = []
    for items in backends.REFERENCE_SHAPES.values():
        for heads, head_dim, q, kv in items:
            shape = backends.Shape(heads, head_dim, min(q, cap or q), min(kv, cap or kv), verdicts["dtype"])
            if kv != 77 and shape not in shapes:  # self-attention only: the big calls, where kernels differ
                shapes.append(shape)
    machine = backends.Machine(report, verdicts["device"])
    todo = []
    for row in verdicts["backends"]:
        if row["status"] == backends.USABLE:
            b = backends.get(row["backend"])
            todo += [(b, s) for s in shapes if b.verdict(machine, s).usable]
    results = []
    with Progress(console=err, disable=quiet, transient=True) as bar:
        task = bar.add_task("probing backends", total=len(todo))
        for b, s in todo:
            bar.update(task, description=f"{b.name} {s}")
            results.append(backends.measure(b, s, verdicts["device"], repeats=3))
            bar.advance(task)
    return results


def main() -> None:
    app(prog_name="sdcli")  # also under `python -m sdcli`, so completion and usage say `sdcli`
