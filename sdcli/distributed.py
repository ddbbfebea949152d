"""One run over many processes: a launcher (torchrun, `accelerate launch`) starts N copies of
`sdcli generate`; each takes its share of the work, and rank 0 writes one manifest for all of it.

sdcli has no cluster code of its own. It reads the ranks the launcher set, gives each rank whole
batches of the single-process run (so every image has the pixels one process would make), and keeps
its records on disk: each rank appends a line per finished image to its own part file, so a crash
loses nothing. torch.distributed is used once, at the end, only so that rank 0 merges after every
rank is done; a re-run with `--resume` finishes the job and the manifest whatever happened before.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from sdcli.errors import BadImages, Interrupted, SdcliError

MANIFEST = "manifest.jsonl"
PARTS = ".sdcli-manifest"  # one part file per rank, next to the images
# Ranks finish at different times (a resumed run can leave one rank most of the work). Waiting is
# safe: if a rank dies, the launcher stops the others.
WAIT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by a launcher, even with one process

    @property
    def main(self) -> bool:
        return self.rank == 0


def detect(env=None) -> Ranks:
    """The ranks torchrun and `accelerate launch` (which runs torchrun) put in the environment."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Ranks()
    try:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise SdcliError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, not {env.get('RANK')!r}, "
                         f"{env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}") from None
    if not 0 <= rank < world_size:
        raise SdcliError(f"RANK {rank} must be between 0 and WORLD_SIZE - 1 ({world_size - 1})")
    return Ranks(rank, world_size, local_rank, launched=True)


def share(items: list, batch_size: int, ranks: Ranks) -> list:
    """This rank's items: batch j of the single-process run (items[j*B:(j+1)*B]) goes to rank j % world_size.
    Whole batches, because batched matmuls round by the batch's shape: an image comes out the same only in
    the batch it has in one process. Every batch but the last is full, so batching the result again by B
    gives back the same batches."""
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return [item for j, batch in enumerate(batches) if j % ranks.world_size == ranks.rank for item in batch]


def device_for(ranks: Ranks, requested: str | None) -> str | None:
    """`auto` and `cuda` mean this rank's own GPU, cuda:LOCAL_RANK; anything else is taken as asked."""
    if requested not in (None, "auto", "cuda"):
        return requested
    import torch

    if not torch.cuda.is_available():
        return requested
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise SdcliError(f"local rank {ranks.local_rank} has no GPU of its own: this node has {count}, "
                         f"so start at most {count} processes on it (--nproc-per-node {count})")
    torch.cuda.set_device(ranks.local_rank)  # so that anything that says just "cuda" lands here too
    return f"cuda:{ranks.local_rank}"


# ----- --resume: what is already done -------------------------------------------------------------------

def finished(items: list, options) -> dict[int, Path]:
    """Items already done: `<stem>.png` is a complete PNG whose recipe is this item's. Removes these items'
    leftover temp files and broken `<stem>.png`s, so each item left is made again under its own name."""
    from sdcli.images import PIXEL_SETTINGS, pixel_settings

    folder = options.work.output_dir
    names = set(os.listdir(folder)) if folder.is_dir() else set()  # made at the first image
    stems = {item.stem: item for item in items}
    for name in names:  # temp files of a killed run: .<stem>.<pid>.partial.png
        if name.startswith(".") and name.endswith(".partial.png") and name[1:-12].rsplit(".", 1)[0] in stems:
            (folder / name).unlink(missing_ok=True)
    done = {}
    for stem, item in stems.items():
        path = folder / f"{stem}.png"
        if path.name not in names:
            continue
        recipe = complete_recipe(path)
        if recipe is None:
            path.unlink()  # cut short (a name only sdcli makes, a PNG that isn't whole): make it again
            continue
        if not recipe:
            raise SdcliError(f"--resume: {path} is in the way: a PNG that sdcli did not make; move it, or write "
                             "to another --output-dir")
        if not isinstance(recipe.get("settings"), dict):
            raise SdcliError(f"--resume: {path}'s recipe doesn't record the settings that decide its pixels (made "
                             "by an older sdcli); write to another --output-dir")
        theirs = {"item": recipe.get("item"), "seed": recipe.get("seed"), "prompt": recipe.get("prompt"),
                  **{key: recipe["settings"].get(key) for key in PIXEL_SETTINGS}}
        ours = {"item": item.index, "seed": item.seed, "prompt": item.prompt, **pixel_settings(options)}
        if theirs != ours:  # an image made otherwise has other pixels: not this run's
            key = next(k for k in ours if theirs[k] != ours[k])
            raise SdcliError(f"--resume: {path} was made with {key} {theirs[key]!r}, this run has {ours[key]!r}; "
                             "resume with the settings of the first run, or write to another --output-dir")
        done[item.index] = path
    return done


def complete_recipe(path: Path) -> dict | None:
    """The sdcli recipe of a PNG that is whole (every chunk there, CRCs right): {} if it has none; None if
    the file is not a whole PNG."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception:
        return None
    try:
        with Image.open(path) as im:
            recipe = json.loads(im.text["sdcli"])
        return recipe if isinstance(recipe, dict) else {}
    except Exception:
        return {}


# ----- the manifest --------------------------------------------------------------------------------------


def part_path(folder: Path, rank: int) -> Path:
    return folder / PARTS / f"rank-{rank:05d}.jsonl"


class Part:
    """This rank's record, one JSON line per finished image, flushed as it is written so a crash right after loses
    nothing. A fresh run starts it over; --resume adds to it. The file (and the output folder) is made at the first
    line: a run that makes nothing writes nothing."""

    def __init__(self, folder: Path, rank: int, resume: bool):
        self.path, self.file = part_path(folder, rank), None
        if not resume:
            self.path.unlink(missing_ok=True)

    def record(self, result, rank: int, backend: str) -> None:
        line = {"item": result.item.index, "prompt": result.item.prompt, "seed": result.item.seed,
                "file": result.path.name, "rank": rank, "backend": backend, "seconds": round(result.seconds, 4),
                "finished": now()}
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a", encoding="utf-8")
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def read_lines(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a rank killed mid-write
            continue
    return [line for line in lines if isinstance(line, dict)]


def merge(items: list, folder: Path, world_size: int, resume: bool) -> list[dict]:
    """One line per finished item, sorted by item. Lines come from this run's part files (with --resume also
    from every older record there); for an item with several, the newest whose image exists wins. With
    --resume an image on disk that no record names gets a line from its own recipe."""
    parts = [part_path(folder, rank) for rank in range(world_size)]
    if resume:  # also the records of an older run with more ranks
        parts += [path for path in sorted((folder / PARTS).glob("rank-*.jsonl")) if path not in parts]
    candidates = read_lines(folder / MANIFEST) if resume else []
    for path in parts:
        candidates += read_lines(path)
    by_index = {item.index: item for item in items}
    best: dict[int, dict] = {}
    for line in candidates:
        item = by_index.get(line.get("item"))
        if item is None or line.get("seed") != item.seed or line.get("prompt") != item.prompt:
            continue
        if not (folder / Path(str(line.get("file"))).name).is_file():
            continue
        if resume and line["file"] != f"{item.stem}.png":
            continue
        old = best.get(item.index)
        if old is None or str(line.get("finished") or "") >= str(old.get("finished") or ""):
            best[item.index] = line
    if resume:
        for item in items:
            path = folder / f"{item.stem}.png"
            if item.index not in best and path.is_file() and (recipe := complete_recipe(path)):
                best[item.index] = {"item": item.index, "prompt": item.prompt, "seed": item.seed, "file": path.name,
                                    "rank": None, "backend": recipe.get("attention"), "seconds": None,
                                    "finished": None}
    return [best[i] for i in sorted(best)]


def write_manifest(folder: Path, lines: list[dict]) -> Path | None:
    """Replace <folder>/manifest.jsonl atomically: readers see the old one or the new one, never half. None (and
    nothing written) when there is nothing to list and no manifest to replace."""
    path = folder / MANIFEST
    if not lines and not path.exists():
        return None
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----- the end of a run: every rank's outcome to rank 0 --------------------------------------------------


def host() -> str:
    return socket.gethostname()


def collectives(ranks: Ranks) -> bool:
    """Whether ranks can wait for each other: torch.distributed is there and the launcher gave an address."""
    if ranks.world_size == 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return False
    import torch.distributed as dist

    return dist.is_available()


def gather(outcome: dict, ranks: Ranks) -> list[dict] | None:
    """Every rank's outcome, on every rank, once all are done; None where ranks can't wait for each other.
    gloo even on GPUs: a few small objects, no GPU memory, and no NCCL watchdog to trip while ranks wait."""
    if not collectives(ranks):
        return [outcome] if ranks.world_size == 1 else None
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://", rank=ranks.rank, world_size=ranks.world_size, timeout=WAIT)
    outcomes: list = [None] * ranks.world_size
    dist.all_gather_object(outcomes, outcome)
    return outcomes


def finish(ranks: Ranks) -> None:
    """Wait until rank 0 has written the manifest and said its piece, then leave: a rank that exits with an
    error makes the launcher stop the others, and rank 0 must not be stopped half-way."""
    import torch.distributed as dist

    if collectives(ranks) and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----- one rank's run, start to end ------------------------------------------------------------------------


def generate_share(options, ranks: Ranks, resume: bool, view) -> tuple[dict, int]:
    """This process's share of the work (under a launcher, or with --resume), recorded line by line; then
    every rank waits for the others, and rank 0 writes the manifest and reports. Other ranks print only errors.
    A rank that fails says so at once, then waits too, so the others finish their shares. Returns rank 0's report
    of every rank (another rank's: its own outcome), and this rank's exit status. `view` shows it all (sdcli.views.GenerateView): loading(quiet) and making(images, steps, quiet), two
    contexts whose callbacks follow the run; show(summary, quiet), interrupted(text), error(text), warning(text)."""
    from sdcli import devices, hardware, pipeline
    from sdcli.images import attention_summary

    folder = options.work.output_dir
    items = pipeline.work_items(options)
    mine = share(items, options.work.batch_size, ranks)
    several = ranks.world_size > 1
    quiet = view.quiet
    speaks = ranks.main and not quiet
    run, done, error, code = None, {}, None, 0
    try:
        with Part(folder, ranks.rank, resume) as part:
            if resume:
                done = finished(mine, options)
            if len(done) < len(mine):  # else this rank has nothing left to make: no model to load
                device = device_for(ranks, options.placement.device)
                on_this_rank = replace(options, placement=replace(options.placement, device=device))
                gpu = devices.gpu_index(device)
                with view.loading(not speaks) as on_progress:
                    machine = pipeline.machine_for(on_this_rank, hardware.probe(only_gpu=gpu) if several else None)
                    run = pipeline.prepare(on_this_rank, machine, on_progress)
                with view.making(len(mine) - len(done), options.sampling.steps, not speaks) as (on_step, shown):
                    def on_image(result):
                        shown(result)
                        part.record(result, ranks.rank, attention_summary(run.router))

                    pipeline.generate(run, mine, on_step, on_image, skip=set(done), rank=ranks.rank if several else None)
    except Interrupted as exc:
        error, code = "interrupted", exc.exit_code
        view.interrupted(str(exc))
    except KeyboardInterrupt:
        error, code = "interrupted", 130
        view.interrupted(f"{'rank %d: ' % ranks.rank if several else ''}interrupted")
    except Exception as exc:
        if os.environ.get("SDCLI_DEBUG"):
            import traceback

            traceback.print_exc()
        error = str(exc) if isinstance(exc, SdcliError) else f"{type(exc).__name__}: {exc}"
        if several and not error.startswith(f"rank {ranks.rank}: "):
            error = f"rank {ranks.rank}: {error}"
        code = getattr(exc, "exit_code", 1)
        view.error(error)
    outcome = {"rank": ranks.rank, "local_rank": ranks.local_rank, "host": host(),
               "device": run.device if run else None, "error": error, "exit_code": code,
               "images": [r.to_json() for r in run.images] if run else [], "skipped": sorted(done),
               "seconds": round(run.seconds, 3) if run else 0.0,
               "load_seconds": round(run.load_seconds, 3) if run else 0.0,
               "peak_gpu_memory_gb": run.peak_memory_gb if run else None,
               "served": dict(run.router.served()) if run and run.router else {}}
    outcomes = gather(outcome, ranks)
    summary = outcome
    try:
        if ranks.main:
            manifest = write_manifest(folder, merge(items, folder, ranks.world_size, resume))
            if outcomes is None and several:
                view.warning("the ranks can't wait for each other here (no MASTER_ADDR/MASTER_PORT "
                          "from a launcher, or no torch.distributed), so the manifest lists only what was finished "
                          "by now; run the same command with --resume to complete it")
            summary = sum_up_ranks(run, options, outcomes or [outcome], manifest, view, quiet or code != 0)
    except SdcliError as exc:  # said here, not after finish(): by then the launcher may be stopping this process
        view.error(str(exc))
        code = code or exc.exit_code
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        finish(ranks)
    return summary, code


def sum_up_ranks(run, options, outcomes: list[dict], manifest: Path | None, view, quiet: bool) -> dict:
    """Rank 0's report: every rank's images in one summary, the manifest, and which ranks failed; returns the
    summary. Rank 0's exit status stays its own, so that the launcher names the rank that failed as the root
    cause."""
    from sdcli import pipeline

    images = sorted((image for o in outcomes for image in o["images"]), key=lambda image: image["item"])
    seconds = max(o["seconds"] for o in outcomes)  # ranks run side by side
    summary = run.to_json() if run else {"settings": options.flat(), "attention": None,
                                         "output_dir": str(options.work.output_dir), "model": None, "dtype": None}
    peaks = [o["peak_gpu_memory_gb"] for o in outcomes if o["peak_gpu_memory_gb"] is not None]
    summary.update({
        "images": images, "problems": [image for image in images if image["problem"]],
        "skipped": sorted(i for o in outcomes for i in o["skipped"]),
        "device": ", ".join(dict.fromkeys(o["device"] for o in outcomes if o["device"])) or None,
        "seconds": round(seconds, 3),
        "seconds_per_image": round(sum(o["seconds"] for o in outcomes) / len(images), 4) if images else None,
        "images_per_second": round(len(images) / seconds, 4) if images and seconds else None,
        "peak_gpu_memory_gb": max(peaks) if peaks else None,
        "manifest": str(manifest) if manifest else None, "world_size": len(outcomes),
        "ranks": [{k: v for k, v in o.items() if k != "images"} | {"images": len(o["images"])} for o in outcomes],
    })
    failed = [o for o in outcomes if o["error"] and o["rank"] != 0]
    view.show(summary, quiet)
    if summary["problems"] and not failed:
        raise BadImages(summary["problems"])
    if failed:  # each failed rank said what and where, and exits non-zero; this is the sum of it
        n = len(images) + len(summary["skipped"])
        listed = f"listed in {manifest}" if manifest else "kept"
        view.error(f"{len(failed)} of {len(outcomes)} ranks failed "
                   f"({'; '.join(o['error'] for o in failed)}); {n} finished image{'s' if n != 1 else ''} {listed}; "
                   f"{pipeline.resume_hint(options)}")
    return summary
