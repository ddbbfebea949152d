"""Every attention backend sdcli knows, declared once.

A backend is a name, a kind (exact or quantized), how to run it (a diffusers `AttentionBackendName`
served through `dispatch_attention_fn`, or a function of its own) and a list of small checks. A check
looks at a machine (a hardware report, see hardware.py) and, when given, one attention shape, and
returns None or a Refusal that says why not and what to do. The first refusal is the verdict.

Other packages add backends through the entry-point group `sdcli.backends`: the entry point is a
Backend, a list of them, or a function returning either.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Callable

from sdcli import kernels
from sdcli.errors import UnknownBackend, error_line
from sdcli.hardware import Machine

EXACT = "exact"          # same maths as softmax(QK^T/sqrt(d))V, differences are rounding only
QUANTIZED = "quantized"  # computes in lower precision on purpose (INT8/FP8): results move more

# Verdicts, from best to worst. Shape refusals concern one layer, the others the whole machine.
USABLE = "usable"
UNSUPPORTED_SHAPE = "unsupported shape"
NOT_INSTALLED = "not installed"
WRONG_VERSION = "wrong version"
BROKEN = "broken install"
UNSUPPORTED_GPU = "unsupported on this GPU"
NEEDS_GPU = "needs a GPU"  # the run is on the CPU



@dataclass(frozen=True)
class Shape:
    """One attention call as a backend sees it: (batch, seq, heads, head_dim) tensors."""

    heads: int
    head_dim: int
    q_len: int | None = None
    kv_len: int | None = None
    dtype: str = "fp16"
    mask: bool = False
    batch: int | None = None  # known for shapes seen in a run; the checks don't depend on it

    @property
    def key(self) -> tuple:
        """What a kernel choice depends on (not the batch)."""
        return (self.heads, self.head_dim, self.q_len, self.kv_len, self.dtype, self.mask)

    def __str__(self) -> str:
        seq = f" q{self.q_len}·kv{self.kv_len}" if self.q_len else ""
        return f"{self.heads}×{self.head_dim}{seq} {self.dtype}" + (" masked" if self.mask else "")


@dataclass(frozen=True)
class Refusal:
    status: str
    reason: str
    fix: str = ""


@dataclass(frozen=True)
class Verdict:
    backend: str
    status: str
    reason: str = ""
    fix: str = ""

    @property
    def usable(self) -> bool:
        return self.status == USABLE


# ----- checks: each returns None (fine) or a Refusal -------------------------------------------------

Check = Callable[[Machine, "Shape | None"], "Refusal | None"]


def _version_tuple(v: str) -> tuple:
    parts = []
    for piece in v.split("+")[0].split("."):
        digits = re.match(r"\d*", piece).group()
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():  # 0.0.29.post1 / 2.1.1rc1 / 4.0.0b36 ... the release numbers only
            break
    return tuple(parts)


def torch_version(m: Machine) -> str | None:
    """The torch version a report names: its package entry, else its torch section."""
    return m.package("torch").get("version") or m.report.get("torch", {}).get("version")


def package(key: str, pip_name: str, min_version: str | None = None, how: str = "",
            needed_by: str = "diffusers") -> Check:
    """The package is installed, imports, and is new enough for diffusers' wrapper (or `needed_by`)."""
    install = f"pip install '{pip_name}>={min_version}'" if min_version else f"pip install {pip_name}"
    install += how

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        info = m.package(key)
        if not info.get("version") and not info.get("import_ok"):
            return Refusal(NOT_INSTALLED, f"{pip_name} is not installed", install)
        if min_version and info.get("version") and _version_tuple(info["version"]) < _version_tuple(min_version):
            return Refusal(WRONG_VERSION, f"{pip_name} {info['version']} is installed; {needed_by} needs ≥ {min_version}",
                           install.replace("pip install", "pip install -U", 1))
        if info.get("import_ok") is False:
            return Refusal(BROKEN, f"{pip_name} {info.get('version') or ''} fails to import: {info.get('error')}",
                           f"reinstall it for torch {m.package('torch').get('version')}: {install} --force-reinstall")
        return None

    check.__name__ = f"package({key})"
    return check


def diffusers_accepts(name: str, key: str, how: str = "") -> Check:
    """diffusers' own requirement check accepts its backend `name` here (the report carries diffusers' verdict,
    see hardware.diffusers_backends): sdcli asks diffusers rather than copy its rules. `key`: the package it
    judged. Placed after the checks that say more precisely what is wrong with the package."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        refusal = m.diffusers_refusal(name)
        if not refusal:
            return None
        wanted = re.search(r"install `([^`]+)`", refusal)  # `pkg>=x.y`, or in words: "Please build ... from source"
        fix = f"pip install -U '{wanted.group(1)}'{how}" if wanted else refusal.partition("Please ")[2]
        return Refusal(WRONG_VERSION, f"{key} {m.package(key).get('version') or ''} is installed, but diffusers "
                                      f"can't use it: {refusal}", fix)

    check.__name__ = f"diffusers_accepts({name})"
    return check


# xformers 0.0.35's _C.so links libcudart.so.12, which a CUDA 13 torch doesn't ship; this wheel does (lead:
# not yet seen to make the ops load on a GPU, and a wheel built for another torch may still fail after it).
CUDART12_FIX = ("pip install nvidia-cuda-runtime-cu12, then start sdcli with its library on the loader's path: "
                "export LD_LIBRARY_PATH=\"$(python -c 'import nvidia.cuda_runtime as m; print(m.__path__[0])')/lib"
                ":$LD_LIBRARY_PATH\" (unverified on a GPU)")


def xformers_ops(m: Machine, shape: Shape | None) -> Refusal | None:
    """xformers' compiled ops load, and `xformers.ops` imports: each failure named, both when both fail (fixing
    one leaves the other). diffusers turns xformers off when the import fails and then calls it "too old"."""
    info = m.package("xformers")
    reasons, fixes = [], []
    if info.get("ops_ok") is False:
        torch_v = m.package("torch").get("version") or "?"
        built = info.get("built_for_torch")
        why = f"built for torch {built}, this is torch {torch_v}" if built else "its C++/CUDA extension does not load"
        load_error = info.get("load_error") or ""
        if "libcudart.so.12" in load_error:
            reasons.append(f"xformers' compiled ops don't load: {load_error} ({why})")
            fixes.append(CUDART12_FIX)
        else:
            reasons.append(f"xformers' compiled ops don't load ({why})")
            fixes.append("pip install xformers matching this torch (see `python -m xformers.info`)")
    error = info.get("ops_import_error")
    if error and "flash_attn" in error and m.package("flash_attn_4").get("version") \
            and not m.package("flash_attn").get("version"):
        reasons.append(f"import xformers.ops fails: {error}: flash-attn-4's flash_attn/ folder (no __init__.py, no "
                       "flash-attn 2 in it) makes xFormers' flash op look for flash-attn 2")
        fixes.append("install flash-attn-4 in an environment of its own (or pip install --target DIR and put DIR on "
                     "PYTHONPATH only for FlashAttention-4 runs), or pip uninstall flash-attn-4")
    elif error:
        reasons.append(f"import xformers.ops fails: {error}")
        fixes.append("pip install xformers matching this torch (see `python -m xformers.info`)")
    if reasons:
        return Refusal(BROKEN, "; and ".join(reasons), "; and ".join(dict.fromkeys(fixes)))
    return None


def cuda(m: Machine, shape: Shape | None) -> Refusal | None:
    if not m.is_cuda:
        return Refusal(NEEDS_GPU, "needs an NVIDIA GPU; this run is on the CPU", "run on a CUDA GPU")
    return None


def sm_at_least(major: int, minor: int = 0, what: str = "") -> Check:
    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        cc = m.compute_capability
        if m.is_cuda and cc and cc < (major, minor):
            return Refusal(UNSUPPORTED_GPU, f"needs SM{major}{minor}+{what}; {m.gpu_label} is too old",
                           "use another backend on this GPU (sdcli picks one with --backend auto)")
        return None

    check.__name__ = f"sm_at_least({major}.{minor})"
    return check


def sm_in(*ccs: tuple[int, int], what: str = "") -> Check:
    names = "/".join(f"SM{a}{b}" for a, b in ccs)

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        cc = m.compute_capability
        if m.is_cuda and cc and cc not in ccs:
            return Refusal(UNSUPPORTED_GPU, f"runs only on {names}{what}; this is {m.gpu_label}",
                           "use another backend on this GPU (sdcli picks one with --backend auto)")
        return None

    check.__name__ = f"sm_in({names})"
    return check


def on_cuda(inner: Check) -> Check:
    """A limit of the CUDA kernel that torch's CPU kernel of the same name does not have."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        return inner(m, shape) if m.is_cuda else None

    check.__name__ = f"on_cuda({inner.__name__})"
    return check


def dtypes(*allowed: str) -> Check:
    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        if shape and shape.dtype not in allowed:
            return Refusal(UNSUPPORTED_SHAPE, f"takes {'/'.join(allowed)} only, not {shape.dtype}",
                           "run in --dtype fp16 or bf16")
        return None

    check.__name__ = f"dtypes({','.join(allowed)})"
    return check


def head_dim_at_most(limit: int) -> Check:
    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        if shape and shape.head_dim > limit:
            return Refusal(UNSUPPORTED_SHAPE, f"head dim {shape.head_dim} > {limit}")
        return None

    check.__name__ = f"head_dim_at_most({limit})"
    return check


def fp8(m: Machine, shape: Shape | None) -> Refusal | None:
    supported = m.dtype_supported("fp8_e4m3")
    cc = m.compute_capability
    if m.is_cuda and (supported is False or (supported is None and cc and cc < (8, 9))):
        return Refusal(UNSUPPORTED_GPU, f"needs fp8 (SM89+: Ada, Hopper, Blackwell); {m.gpu_label} has none",
                       "use the int8/fp16 variant: --backend sage")
    return None


def no_mask(m: Machine, shape: Shape | None) -> Refusal | None:
    if shape and shape.mask:
        return Refusal(UNSUPPORTED_SHAPE, "takes no attention mask")
    return None


def torch_at_least(version: str) -> Check:
    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        have = torch_version(m)
        if have and _version_tuple(have) < _version_tuple(version):
            return Refusal(WRONG_VERSION, f"needs torch ≥ {version}, this is {have}", f"pip install -U 'torch>={version}'")
        return None

    check.__name__ = f"torch_at_least({version})"
    return check


def cuda_because(why: str) -> Check:
    """Like `cuda`, for a kernel that runs on the CPU too but is no use there (say why: measured)."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        if not m.is_cuda:
            return Refusal(NEEDS_GPU, f"needs an NVIDIA GPU: {why}", "use sdpa on the CPU")
        return None

    check.__name__ = "cuda_because"
    return check


def head_dim_in(*dims: int) -> Check:
    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        if shape and shape.head_dim not in dims:
            return Refusal(UNSUPPORTED_SHAPE, f"head dim {shape.head_dim} not in {'/'.join(map(str, dims))}")
        return None

    check.__name__ = f"head_dim_in({dims})"
    return check


def kv_len_multiple_of(n: int, why: str) -> Check:
    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        if shape and shape.kv_len and shape.kv_len % n:
            return Refusal(UNSUPPORTED_SHAPE, f"{shape.kv_len} keys, not a multiple of {n}: {why}")
        return None

    check.__name__ = f"kv_len_multiple_of({n})"
    return check


def fa4_head_dim(m: Machine, shape: Shape | None) -> Refusal | None:
    """FlashAttention-4's head dims, from flash_attn/cute/interface.py (4.0.0b36): multiples of 8 (16-byte rows);
    SM90 8-256; SM100/SM110 8-128 or 256 (its 192 and 512 cases need a different V or qv, not plain attention).
    SM80/SM120 are not checked there: sdcli admits SM90's range, and a kernel error at the first call falls back."""
    if not shape:
        return None
    d, cc = shape.head_dim, m.compute_capability
    if d % 8:
        return Refusal(UNSUPPORTED_SHAPE, f"head dim {d} is not a multiple of 8")
    if cc and cc[0] in (10, 11) and 128 < d != 256:
        return Refusal(UNSUPPORTED_SHAPE, f"head dim {d}: FlashAttention-4 on SM{cc[0]}x takes 8-128 or 256")
    if d > 256:
        return Refusal(UNSUPPORTED_SHAPE, f"head dim {d} > 256")
    return None


def flex_head_dim(m: Machine, shape: Shape | None) -> Refusal | None:
    """Compiled flex_attention's Triton kernel on CUDA: head dims under 16 fail, and the VAE's 512-wide head needs
    about 256 KB of shared memory against an H100's 227 KB (lead: read, not run). The first call's kernel error
    would fall back anyway, but only after a compile each time."""
    if not shape or not m.is_cuda:
        return None
    if shape.head_dim < 16:
        return Refusal(UNSUPPORTED_SHAPE, f"head dim {shape.head_dim} < 16: compiled flex_attention fails below 16 "
                                          "on CUDA")
    if shape.head_dim > 256:
        return Refusal(UNSUPPORTED_SHAPE, f"head dim {shape.head_dim} > 256: compiled flex_attention's kernel needs "
                                          "more shared memory than a GPU has (about 256 KB at 512; an H100 has 227 KB)")
    return None


def torch_flash_impl(impl: str) -> Check:
    """torch can swap `impl` in as SDPA's flash kernel (torch.nn.attention.activate_flash_attention_impl)."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        impls = m.report.get("torch", {}).get("flash_attention_impls") or []
        if impl not in impls:
            have = torch_version(m)
            return Refusal(WRONG_VERSION, f"torch {have} can't swap {impl} into SDPA "
                                          "(no torch.nn.attention.activate_flash_attention_impl)",
                           "pip install -U torch  (2.13 has it)")
        return None

    check.__name__ = f"torch_flash_impl({impl})"
    return check


def torch_fa4_bridge(m: Machine, shape: Shape | None) -> Refusal | None:
    """torch's FA4 bridge (torch/nn/attention/_fa4.py) by torch version. 2.11 to 2.13 take `out, lse =
    _flash_attn_fwd(...)`, while flash-attn-4 returns four values from 4.0.0b19 and five from 4.0.0b34 (sdcli needs
    4.0.0b36): every call raises. 2.14.1 and 2.15.0 take `out, lse, *_`. What FA4 can't take (fp32, dropout, a GPU
    other than SM 9.x/10.x) the bridge up to 2.14 hands to torch's own FlashAttention-2, so FA4 would silently not
    run; from 2.15 it raises. Either way sdcli refuses it, saying which."""
    have = torch_version(m)
    version = _version_tuple(have) if have else ()
    if version and version[:2] <= (2, 13):
        return Refusal(WRONG_VERSION, f"torch {have}'s FA4 bridge takes 2 results from flash-attn-4's forward, "
                                      "which returns 4-5 since 4.0.0b19: every call raises",
                       "--backend flash-attn-4 runs the same kernels directly")
    does = "raises" if version[:2] >= (2, 15) else "runs torch's own FlashAttention-2 instead (FA4 would not run)"
    cc = m.compute_capability
    if m.is_cuda and cc and cc[0] not in (9, 10):
        return Refusal(UNSUPPORTED_GPU, f"runs only on SM9x/SM10x: on {m.gpu_label} torch {have}'s FA4 bridge {does}",
                       "--backend flash-attn-4 runs FlashAttention-4 directly on SM80+")
    if shape and shape.dtype not in ("fp16", "bf16"):
        return Refusal(UNSUPPORTED_SHAPE, f"takes fp16/bf16 only: in {shape.dtype} torch {have}'s FA4 bridge {does}",
                       "run in --dtype fp16 or bf16")
    return None


def older_than(key: str, pip_name: str, below: str, fix: str) -> Check:
    """The installed package is from before `below` (a newer line that other backends serve)."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        have = m.package(key).get("version")
        if have and _version_tuple(have) >= _version_tuple(below):
            return Refusal(WRONG_VERSION, f"{pip_name} {have} is installed; this backend is for < {below}", fix)
        return None

    check.__name__ = f"older_than({key}, {below})"
    return check


# ----- the registry -----------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    summary: str
    kind: str = EXACT
    diffusers_name: str | None = None  # run through diffusers' dispatch_attention_fn under this name
    attention: Callable | None = None  # or this: fn(q, k, v, attn_mask=None, scale=None), (B, S, H, D) layout
    checks: list[Check] = field(default_factory=list)
    origin: str = "sdcli"              # or the distribution that registered it
    in_auto: bool = True               # whether measured `auto` and `bench` try it (False: slow by design)
    release: str | None = None         # a plug-in's distribution version (+ a hash of its files if editable)

    def verdict(self, machine: Machine, shape: Shape | None = None) -> Verdict:
        for check in self.checks:
            try:
                refusal = check(machine, shape)
                if refusal is not None and not isinstance(refusal, Refusal):
                    raise TypeError(f"returned {type(refusal).__name__}, not a Refusal or None")
            except Exception as exc:  # a plug-in's faulty check is a verdict on that plug-in, not the command's end
                return Verdict(self.name, BROKEN, f"broken plug-in: its check {getattr(check, '__name__', check)} "
                                                  f"raised {error_line(exc)}", f"fix or uninstall {self.origin}")
            if refusal:
                return Verdict(self.name, refusal.status, refusal.reason, refusal.fix)
        return Verdict(self.name, USABLE)

    def run(self, q, k, v, attn_mask=None, scale=None):
        """Attention on (batch, seq, heads, head_dim) tensors; returns the same layout."""
        return self.call(q, k, v, attn_mask=attn_mask, scale=scale)

    @cached_property
    def call(self) -> Callable:
        """The backend's function, resolved once. For a diffusers backend that is the function diffusers'
        dispatcher (dispatch_attention_fn) looks up for the name and would call with these same arguments:
        calling it directly saves the dispatcher's per-call argument handling (docs/benchmarks.md). With
        DIFFUSERS_ATTN_CHECKS=1 the dispatcher itself runs, its checks included."""
        if self.attention is not None:
            return self.attention
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, \
            dispatch_attention_fn

        name = AttentionBackendName(self.diffusers_name)
        resolved = None if _AttentionBackendRegistry._checks_enabled else _AttentionBackendRegistry._backends.get(name)
        return resolved or partial(dispatch_attention_fn, backend=name)


_REGISTRY: dict[str, Backend] = {}
_PLUGIN_ERRORS: dict[str, str] = {}
_plugins_loaded = False
ENTRY_POINT_GROUP = "sdcli.backends"


def register(backend: Backend, replace: bool = False) -> Backend:
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    if backend.kind not in (EXACT, QUANTIZED):
        raise ValueError(f"backend kind must be {EXACT!r} or {QUANTIZED!r}, not {backend.kind!r}")
    if (backend.diffusers_name is None) == (backend.attention is None):
        raise ValueError("a backend needs exactly one of diffusers_name or attention")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def load_plugins() -> None:
    """Register backends that other installed packages declare. A broken plugin is reported, not fatal."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            items = obj() if callable(obj) and not isinstance(obj, Backend) else obj
            items = list(items) if isinstance(items, (list, tuple)) else [items]
            if not all(isinstance(b, Backend) for b in items):
                raise TypeError(f"{ep.value} gives {', '.join(type(b).__name__ for b in items)}, not sdcli Backends")
            for backend in items:
                if backend.origin == "sdcli":
                    backend.origin = ep.dist.name if ep.dist else ep.value
                backend.release = release(ep)
                register(backend)
        except Exception as exc:
            _PLUGIN_ERRORS[ep.name] = f"broken plug-in: {error_line(exc)}"


def release(ep) -> str | None:
    """A plug-in's version, for auto's plan key: its distribution's version, plus a hash of its module files
    when it is installed editable (its code then changes without a new version)."""
    import hashlib
    import json
    import sys
    from pathlib import Path

    version = ep.dist.version if ep.dist else None
    try:
        editable = json.loads(ep.dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable")
    except (AttributeError, ValueError):
        editable = False
    if not editable:
        return version
    module = sys.modules[ep.module.split(".")[0]]  # loaded by ep.load()
    roots = [Path(p) for p in getattr(module, "__path__", [])] or [Path(module.__file__)]
    files = sorted(f for root in roots for f in ([root] if root.is_file() else root.rglob("*.py")))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    return f"{version}+src.{digest}"


def all_backends() -> list[Backend]:
    load_plugins()
    return list(_REGISTRY.values())


def plugin_errors() -> dict[str, str]:
    load_plugins()
    return dict(_PLUGIN_ERRORS)


def get(name: str) -> Backend:
    load_plugins()
    if name not in _REGISTRY:
        raise UnknownBackend(name, list(_REGISTRY))
    return _REGISTRY[name]


def usable_here(machine: Machine, shape: Shape | None = None, quantized: bool = True,
                in_auto_only: bool = False) -> list[Backend]:
    """The registered backends whose checks pass on `machine` (at `shape`, if given); without `quantized` exact
    ones only; with `in_auto_only` not those that are slow by design."""
    return [b for b in all_backends() if (quantized or b.kind == EXACT) and (b.in_auto or not in_auto_only)
            and b.verdict(machine, shape).usable]


FLASH_HOW = " --no-build-isolation  (no wheel on PyPI: builds from source, needs the CUDA toolkit)"
FLASH3_HOW = "  (build from flash-attention/hopper; Hopper GPUs only)"
FLASH4_HOW = "  (a pre-release, compiled at first use; with a CUDA 13 torch: 'flash-attn-4[cu13]>=4.0.0b36')"
SAGE2_HOW = "  (2.x builds from source: github.com/thu-ml/SageAttention; PyPI's 1.0.6 serves --backend sage1)"
# Measured on the project's 2-core CPU (docs/design.md): compiling takes 0.3-17 s per shape, and the compiled
# kernel was slower than sdpa at every shape tried. Every test that runs "each usable backend" would pay that.
FLEX_ON_CPU = "on the CPU it compiles for seconds per shape and then runs slower than sdpa (measured)"
SAGE1_PADDING = "SageAttention 1.0.6 lets the padding keys into the softmax (relative error 0.29 at 77 keys)"
half = dtypes("fp16", "bf16")
fa4_installed = package("flash_attn_4", "flash-attn-4", "4.0.0b36", FLASH4_HOW, needed_by="sdcli")

for _b in [
    Backend("sdpa", "PyTorch scaled_dot_product_attention; torch picks the kernel", diffusers_name="native"),
    Backend("sdpa-flash", "PyTorch SDPA, FlashAttention-2 kernel only", diffusers_name="_native_flash",
            checks=[on_cuda(sm_at_least(8, 0)), on_cuda(half), on_cuda(head_dim_at_most(256)), no_mask]),
    Backend("sdpa-efficient", "PyTorch SDPA, memory-efficient (xformers-derived) kernel only",
            diffusers_name="_native_efficient", checks=[cuda, sm_at_least(5, 0)]),
    Backend("sdpa-cudnn", "PyTorch SDPA, cuDNN attention kernel only", diffusers_name="_native_cudnn",
            checks=[cuda, sm_at_least(8, 0), half, head_dim_at_most(128)]),
    Backend("sdpa-math", "PyTorch SDPA, reference math kernel (slow, the most exact)", diffusers_name="_native_math",
            in_auto=False),  # materialises the whole score matrix: the reference, never the fastest
    Backend("flex", "PyTorch flex_attention (slow unless compiled)", diffusers_name="flex",
            checks=[diffusers_accepts("flex", "torch")], in_auto=False),  # eager flex is unfused
    Backend("flex-compiled", "PyTorch flex_attention, compiled once per shape", attention=kernels.flex_compiled,
            checks=[torch_at_least("2.5"), cuda_because(FLEX_ON_CPU),
                    package("triton", "triton", needed_by="torch.compile"), flex_head_dim],
            in_auto=False),  # a compile per shape: every auto plan, bench and default generate would pay them all
    Backend("flash-attn", "FlashAttention-2 (flash-attn package)", diffusers_name="flash",
            checks=[package("flash_attn", "flash-attn", how=FLASH_HOW),
                    diffusers_accepts("flash", "flash_attn", FLASH_HOW), cuda, sm_at_least(8, 0),
                    half, head_dim_at_most(256), no_mask]),
    Backend("flash-attn-3", "FlashAttention-3 for Hopper (flash_attn_interface)", diffusers_name="_flash_3",
            checks=[package("flash_attn_3", "flash-attn-3", how=FLASH3_HOW),
                    diffusers_accepts("_flash_3", "flash_attn_3"),
                    cuda, sm_in((9, 0)), half, head_dim_at_most(256), no_mask]),
    Backend("flash-attn-4", "FlashAttention-4 (flash-attn-4, CuTe DSL)", attention=kernels.flash_attn_4,
            checks=[fa4_installed, cuda, sm_at_least(8, 0), half, fa4_head_dim, no_mask]),
    Backend("sdpa-fa4", "PyTorch SDPA with torch's FlashAttention-4 implementation swapped in",
            attention=kernels.sdpa_fa4,
            checks=[fa4_installed, torch_flash_impl("FA4"), torch_fa4_bridge, cuda, fa4_head_dim, no_mask]),
    Backend("xformers", "xFormers memory_efficient_attention", diffusers_name="xformers",
            checks=[package("xformers", "xformers"), xformers_ops, diffusers_accepts("xformers", "xformers"), cuda,
                    sm_at_least(5, 0)]),
    Backend("sage", "SageAttention 2: INT8 QK, fp16/fp8 PV", kind=QUANTIZED, diffusers_name="sage",
            checks=[package("sageattention", "sageattention", how=SAGE2_HOW),
                    diffusers_accepts("sage", "sageattention", SAGE2_HOW),
                    cuda, sm_in((8, 0), (8, 6), (8, 9), (9, 0), (12, 0), (12, 1)),
                    half, head_dim_at_most(128), no_mask]),
    Backend("sage-fp8", "SageAttention 2: INT8 QK, FP8 PV (Ada, Blackwell)", kind=QUANTIZED,
            diffusers_name="_sage_qk_int8_pv_fp8_cuda",
            checks=[package("sageattention", "sageattention"),
                    diffusers_accepts("_sage_qk_int8_pv_fp8_cuda", "sageattention"), cuda, fp8,
                    sm_in((8, 9), (12, 0), (12, 1), what=" (its SM90 twin is sage-fp8-sm90)"),
                    half, head_dim_at_most(128), no_mask]),
    Backend("sage-fp8-sm90", "SageAttention 2: INT8 QK, FP8 PV, Hopper kernel", kind=QUANTIZED,
            diffusers_name="_sage_qk_int8_pv_fp8_cuda_sm90",
            checks=[package("sageattention", "sageattention"),
                    diffusers_accepts("_sage_qk_int8_pv_fp8_cuda_sm90", "sageattention"), cuda, fp8, sm_in((9, 0)),
                    half, head_dim_at_most(128), no_mask]),
    Backend("sage1", "SageAttention 1 (Triton): INT8 QK, fp16 PV", kind=QUANTIZED, attention=kernels.sage1,
            checks=[package("sageattention", "sageattention", "1.0.6", needed_by="sage1"),
                    older_than("sageattention", "sageattention", "2", "SageAttention 2 serves --backend sage"),
                    cuda, head_dim_in(64, 96, 128), no_mask, kv_len_multiple_of(64, SAGE1_PADDING)]),
]:
    register(_b)
