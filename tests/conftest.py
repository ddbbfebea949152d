import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
REPORTS = Path(__file__).parent / "reports"


def pytest_configure(config):
    # auto's measured plans go to a cache of this test session, not the user's (subprocesses inherit it)
    import tempfile

    os.environ["SDCLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdcli-test-cache-")
    # One thread per test process (and subprocess): on a busy machine torch's threads wait for each other, and the
    # suite took 53 min instead of 4 (issue 23). Tests that compare pixels across processes need it too.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    gpu_items = [i for i in items if "gpu" in i.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)


class Cli:
    """Drives the CLI in-process, the way a user's shell would, and parses --json output."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args, code=0, env=None):
        result = self.runner.invoke(app, [str(a) for a in args], env=env, prog_name="sdcli")
        assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\n{result.output}\n{result.exception!r}"
        return result

    def json(self, *args, code=0, env=None):
        return json.loads(self(*args, "--json", code=code, env=env).stdout)


@pytest.fixture
def cli():
    return Cli()


def run_sdcli(*args, env=None, cwd=None, timeout=300):
    """The installed console script in a subprocess: the real process boundary, exit codes and all."""
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sdcli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def register_backend():
    """Register test backends in this process (as a plugin would), removed again after the test."""
    from sdcli import backends

    names = []

    def register(name, attention, checks=(), kind="exact", **options):
        backends.register(backends.Backend(name, f"test backend {name}", kind=kind, attention=attention,
                                           checks=list(checks), **options), replace=True)
        names.append(name)

    yield register
    for name in names:
        backends.unregister(name)


@pytest.fixture
def declare_builtin(monkeypatch):
    """declare(backend): one more of sdcli's own declarations (sdcli.builtins), the registry made anew as a new
    process makes it; gone after the test."""
    from sdcli import backends, builtins

    def reload():
        backends._REGISTRY.clear()
        backends._PLUGIN_ERRORS.clear()
        backends._plugins_loaded = False

    def declare(backend):
        monkeypatch.setattr(builtins, "backends", [*builtins.backends, backend])
        reload()

    yield declare
    monkeypatch.undo()
    reload()


@pytest.fixture
def plugins():
    """install(folder): the plug-in packages in `folder` (see make_plugin) found by this process the way an
    installed plug-in is, through their `sdcli.backends` entry points; call it again after changing them (an
    upgrade). Whatever they registered is gone after the test."""
    import importlib
    import sys

    from sdcli import backends

    folders = []

    def rescan():  # the registry as a new process makes it: sdcli's own, then the plug-ins found now
        backends._REGISTRY.clear()
        backends._PLUGIN_ERRORS.clear()
        backends._plugins_loaded = False
        for name, module in list(sys.modules.items()):
            if any(str(getattr(module, "__file__", None) or "").startswith(folder) for folder in folders):
                del sys.modules[name]
        importlib.invalidate_caches()

    def install(folder):
        if str(folder) not in folders:
            folders.append(str(folder))
            sys.path.insert(0, str(folder))
        rescan()
        backends.load_plugins()

    yield install
    rescan()
    for folder in folders:
        sys.path.remove(folder)
    folders.clear()


def sdpa(q, k, v, attn_mask=None, scale=None):
    """Plain attention in the (batch, seq, heads, head_dim) layout backends receive."""
    import torch

    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


def pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def make_plugin(folder, name, source, entry_points, version="1.0", editable=False):
    """An installed-looking package (a module plus a dist-info with `sdcli.backends` entry points) in `folder`;
    put `folder` on PYTHONPATH and sdcli finds it the way it finds any plugin. Called again with another
    version, it upgrades the package in place; `editable` marks it installed as `pip install -e` does."""
    import shutil
    import textwrap

    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    for old in folder.glob(f"{name}-*.dist-info"):
        shutil.rmtree(old)
    dist = folder / f"{name}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {name}:{obj}\n" for ep, obj in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[sdcli.backends]\n{lines}")
    if editable:  # PEP 610, as pip records an editable install
        (dist / "direct_url.json").write_text(json.dumps({"url": folder.as_uri(), "dir_info": {"editable": True}}))
    return {"PYTHONPATH": str(folder)}


def make_lora(folder, model="tiny", name="style", seed=0):
    """A LoRA for a built-in tiny model, made offline as diffusers' own tests make one (PEFT's LoraConfig on the
    denoiser's attention projections, random non-zero weights) and saved by the pipeline's save_lora_weights, in
    the format LoRAs are shared in. Returns its path."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdcli import models

    pipe = models.TINY[model]()
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
    layers = get_peft_model_state_dict(denoiser)
    part = "unet_lora_layers" if hasattr(pipe, "unet") else "transformer_lora_layers"
    type(pipe).save_lora_weights(str(folder), **{part: layers}, weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"
