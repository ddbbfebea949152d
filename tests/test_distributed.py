"""`sdcli generate` over several processes (torchrun, gloo on the CPU) and `--resume` after a crash."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import pixels
from sdcli.distributed import Ranks, share
from sdcli.pipeline import Item
from test_generate import UNET_LAYERS

PROMPTS = ["a cat", "a dog on a skateboard", "a red fox", "a lighthouse at dusk", "an astronaut", "a green bicycle"]


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
            "-m", "sdcli", "generate", *map(str, args)]


# torchrun starts each process with OMP_NUM_THREADS=1; on the CPU the thread count changes how matmuls round,
# so the single-process runs in this file (in-process, through `cli`) use one thread too. It also keeps them
# from crawling when another process wants the same cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prompts_file(folder: Path, n: int) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:n]) + "\n")
    return path


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_share_is_whole_batches_round_robin():
    items = [Item(i, "a cat", i) for i in range(11)]
    for world_size in (1, 2, 3, 4):
        for batch_size in (1, 2, 3):
            shares = [share(items, batch_size, Ranks(r, world_size)) for r in range(world_size)]
            assert sorted(i.index for s in shares for i in s) == list(range(11))
            for rank, mine in enumerate(shares):
                for item in mine:
                    assert (item.index // batch_size) % world_size == rank
    assert [i.index for i in share(items, 2, Ranks(1, 2))] == [2, 3, 6, 7, 10]


def test_two_ranks_make_the_single_process_images(cli, tmp_path):
    """Batch size 2 over 2 ranks: rank 0 gets items 0, 1, 4 and rank 1 items 2, 3, each in its own batch."""
    args = ["--prompts-file", prompts_file(tmp_path, 5), "--model", "tiny", "--steps", "2", "--seed", "7",
            "--batch-size", "2"]
    result = subprocess.run(torchrun(*args, "-o", tmp_path / "ranks"), capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Wrote 5 images") == 1 and "with 2 processes" in result.stdout  # rank 0 reports
    single = cli.json("generate", *args, "-o", tmp_path / "single")
    names = sorted(Path(image["file"]).name for image in single["images"])
    assert sorted(p.name for p in (tmp_path / "ranks").glob("*.png")) == names and len(names) == 5
    for name in names:
        assert np.array_equal(pixels(tmp_path / "ranks" / name), pixels(tmp_path / "single" / name)), name
    assert len({pixels(tmp_path / "ranks" / name).tobytes() for name in names}) == 5
    lines = manifest(tmp_path / "ranks")
    assert [(line["item"], line["seed"], line["file"]) for line in lines] == [(i, 7 + i, names[i]) for i in range(5)]
    assert [line["rank"] for line in lines] == [0, 0, 1, 1, 0]
    assert all(line["backend"].startswith("sdpa") and line["seconds"] > 0 for line in lines)


def kill_tree(proc):
    """SIGKILL torchrun and its workers (each in a session of its own): a pre-empted job."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                workers.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    for pid in workers + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
def test_killed_run_resumes_with_nothing_lost_or_doubled(cli, tmp_path):
    out = tmp_path / "out"
    args = ["--prompts-file", prompts_file(tmp_path, 6), "--model", "tiny", "--steps", "20", "--seed", "3",
            "--batch-size", "2"]
    proc = subprocess.Popen(torchrun(*args, "-o", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not list(out.glob("[0-9]*.png")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc)
    survivors = {p.name: p.read_bytes() for p in out.glob("[0-9]*.png")}  # not a temp file the kill left
    assert 0 < len(survivors) < 6  # rank 0 still had its second batch to make

    resumed = cli.json("generate", *args, "-o", out, "--resume")  # one process now: shares change, names don't
    reference = cli.json("generate", *args, "-o", tmp_path / "reference")
    names = sorted(Path(image["file"]).name for image in reference["images"])
    assert sorted(p.name for p in out.glob("*.png")) == names  # one file per item: no -1 copies
    assert not list(out.glob(".*.partial.png"))
    assert {name: (out / name).read_bytes() for name in survivors} == survivors
    assert resumed["skipped"] == sorted(int(name[:5]) for name in survivors)
    for name in names:  # made again in their own batches: the pixels of the uninterrupted run
        assert np.array_equal(pixels(out / name), pixels(tmp_path / "reference" / name)), name
    lines = manifest(out)
    assert [(line["item"], line["file"]) for line in lines] == list(enumerate(names))


def test_resume_remakes_missing_and_broken_images_in_their_batch(cli, tmp_path):
    args = ["a cat", "--num-images", "4", "--model", "tiny", "--steps", "2", "--seed", "5", "--batch-size", "2",
            "-o", tmp_path]
    files = [Path(image["file"]) for image in cli.json("generate", *args)["images"]]
    before = {p.name: pixels(p) for p in files}
    kept = {p.name: p.read_bytes() for p in (files[0], files[3])}
    files[1].unlink()                                            # batch [0, 1] half done
    files[2].write_bytes(files[2].read_bytes()[:2000])           # cut short
    (tmp_path / f".{files[3].stem}.4242.partial.png").write_bytes(b"half")  # a killed run's temp file

    data = cli.json("generate", *args, "--resume")
    assert data["skipped"] == [0, 3] and [Path(i["file"]).name for i in data["images"]] == [files[1].name, files[2].name]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(before) + ["manifest.jsonl"]
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    for name, image in before.items():
        assert np.array_equal(pixels(tmp_path / name), image), name
    lines = manifest(tmp_path)
    assert [line["file"] for line in lines] == [p.name for p in files]
    assert [line["rank"] for line in lines] == [None, 0, 0, None]  # made by a plain run: rebuilt from the PNGs


def test_resume_needs_the_settings_of_the_first_run(cli, tmp_path):
    cli("generate", "a cat", "--model", "tiny", "--steps", "2", "--seed", "5", "-o", tmp_path)
    result = cli("generate", "a cat", "--model", "tiny", "--steps", "3", "--seed", "5", "-o", tmp_path, "--resume",
                 code=2)
    assert f"--resume: {tmp_path / '00000-5-a-cat.png'} was made with steps 2, this run has 3" in result.output


def test_failing_rank_names_itself_and_the_item_and_the_others_finish(tmp_path):
    """Rank 1 breaks in its second image; rank 0 finishes its share, writes the manifest and sums up."""
    (tmp_path / "flaky.py").write_text(textwrap.dedent(f"""
        import os
        import torch
        from sdcli.backends import Backend
        calls = 0
        def attention(q, k, v, attn_mask=None, scale=None):
            global calls
            calls += 1
            if os.environ["RANK"] == "1" and calls > {UNET_LAYERS * 2 + 1}:  # after one image of 2 steps
                raise RuntimeError("illegal memory access")
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
        backend = Backend("flaky", "breaks on rank 1", attention=attention)
    """))
    dist = tmp_path / "flaky-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flaky\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sdcli.backends]\nflaky = flaky:backend\n")
    out = tmp_path / "out"
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(torchrun("--prompts-file", prompts_file(tmp_path, 5), "--model", "tiny", "--steps", "2",
                                     "--seed", "7", "--backend", "flaky", "-o", out),
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert f"rank 1: RuntimeError in item 3 (seed 10): illegal memory access; 1 finished image kept in {out}" \
        in result.stderr
    assert "1 of 2 ranks failed" in result.stderr and "--resume" in result.stderr
    assert "Wrote 4 images" in result.stdout  # rank 0's summary counts every rank's finished images
    assert sorted(p.name[:5] for p in out.glob("*.png")) == ["00000", "00001", "00002", "00004"]
    assert not list(out.glob(".*.partial.png"))
    assert [(line["item"], line["rank"]) for line in manifest(out)] == [(0, 0), (1, 1), (2, 0), (4, 0)]
