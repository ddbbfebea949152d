"""Attention backends: what one is (a declaration), the small checks it is judged by, and the registry.

A backend is one declaration (`Backend`): a name, a kind (exact or quantized), how to run it (a diffusers
`AttentionBackendName` served through `dispatch_attention_fn`, or a function of its own), the package it needs
(`Package`: how the hardware report finds it, the version, the fix), whether `auto` may use it and its place in
auto's documented order, and its checks. A check looks at a machine (a hardware report, see hardware.py) and,
when given, one attention shape, and returns None or a Refusal that says why not and what to do; the first
refusal is the verdict. Everything else (doctor's package table, the report's packages, the plan key's versions,
auto's order) is derived from the registered declarations.

sdcli's own backends (builtins.py) and other packages' are registered the same way: see plugins.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import TYPE_CHECKING, Callable

from sdcli import plugins
from sdcli.errors import UnknownBackend, error_line

if TYPE_CHECKING:  # a check reads a machine; backends don't need the module that makes one
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

    def refusal(self) -> str:
        """Why it can't run here at all, and the fix, as a refusal says it."""
        return f"can't run here ({self.status}): {self.reason}" + (f"; fix: {self.fix}" if self.fix else "")


# ----- checks: each returns None (fine) or a Refusal. `m` is a hardware.Machine ---------------------------------

Check = Callable[["Machine", "Shape | None"], "Refusal | None"]
OTHER_BACKEND = "use another backend on this GPU (sdcli picks one with --backend auto)"


def named(name: str, check: Check) -> Check:
    check.__name__ = name  # what a broken plug-in's verdict calls it
    return check


def shape_check(name: str, why: Callable[[Shape], str | None], fix: str = "") -> Check:
    """A limit of the kernel's shapes: `why(shape)` says why it can't take one (None: it can). Asked only for a
    shape (a machine's verdict has none)."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        reason = why(shape) if shape else None
        return Refusal(UNSUPPORTED_SHAPE, reason, fix) if reason else None

    return named(name, check)


def gpu_check(name: str, fits: Callable[[tuple[int, int]], bool], reason: Callable[[Machine], str]) -> Check:
    """A limit of the kernel's GPU generations: `fits(compute_capability)`; asked only on a GPU that says it."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        cc = m.compute_capability
        return Refusal(UNSUPPORTED_GPU, reason(m), OTHER_BACKEND) if m.is_cuda and cc and not fits(cc) else None

    return named(name, check)


def dtypes(*allowed: str) -> Check:
    return shape_check(f"dtypes({','.join(allowed)})", lambda s: s.dtype not in allowed
                       and f"takes {'/'.join(allowed)} only, not {s.dtype}", "run in --dtype fp16 or bf16")


def head_dim_at_most(limit: int) -> Check:
    return shape_check(f"head_dim_at_most({limit})", lambda s: s.head_dim > limit and f"head dim {s.head_dim} > {limit}")


def head_dim_in(*dims: int) -> Check:
    return shape_check(f"head_dim_in({dims})", lambda s: s.head_dim not in dims
                       and f"head dim {s.head_dim} not in {'/'.join(map(str, dims))}")


def kv_len_multiple_of(n: int, why: str) -> Check:
    return shape_check(f"kv_len_multiple_of({n})", lambda s: bool(s.kv_len and s.kv_len % n)
                       and f"{s.kv_len} keys, not a multiple of {n}: {why}")


no_mask = shape_check("no_mask", lambda s: s.mask and "takes no attention mask")


def sm_at_least(major: int, minor: int = 0, what: str = "") -> Check:
    return gpu_check(f"sm_at_least({major}.{minor})", lambda cc: cc >= (major, minor),
                     lambda m: f"needs SM{major}{minor}+{what}; {m.gpu_label} is too old")


def sm_in(*ccs: tuple[int, int], what: str = "") -> Check:
    names = "/".join(f"SM{a}{b}" for a, b in ccs)
    return gpu_check(f"sm_in({names})", lambda cc: cc in ccs, lambda m: f"runs only on {names}{what}; this is {m.gpu_label}")


def cuda_because(why: str = "", fix: str = "run on a CUDA GPU") -> Check:
    """The kernel needs an NVIDIA GPU (with `why`: it runs on the CPU too, but is no use there; say why: measured)."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        if m.is_cuda:
            return None
        return Refusal(NEEDS_GPU, f"needs an NVIDIA GPU: {why}" if why else "needs an NVIDIA GPU; this run is on the CPU",
                       fix)

    return named("cuda_because" if why else "cuda", check)


cuda = cuda_because()


def on_cuda(inner: Check) -> Check:
    """A limit of the CUDA kernel that torch's CPU kernel of the same name does not have."""
    return named(f"on_cuda({inner.__name__})", lambda m, shape: inner(m, shape) if m.is_cuda else None)


def fp8(m: Machine, shape: Shape | None) -> Refusal | None:
    supported = m.dtype_supported("fp8_e4m3")
    cc = m.compute_capability
    if m.is_cuda and (supported is False or (supported is None and cc and cc < (8, 9))):
        return Refusal(UNSUPPORTED_GPU, f"needs fp8 (SM89+: Ada, Hopper, Blackwell); {m.gpu_label} has none",
                       "use the int8/fp16 variant: --backend sage")
    return None


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


def torch_at_least(version: str) -> Check:
    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        have = torch_version(m)
        if have and _version_tuple(have) < _version_tuple(version):
            return Refusal(WRONG_VERSION, f"needs torch ≥ {version}, this is {have}", f"pip install -U 'torch>={version}'")
        return None

    return named(f"torch_at_least({version})", check)


def older_than(key: str, pip_name: str, below: str, fix: str) -> Check:
    """The installed package is from before `below` (a newer line that other backends serve)."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        have = m.package(key).get("version")
        if have and _version_tuple(have) >= _version_tuple(below):
            return Refusal(WRONG_VERSION, f"{pip_name} {have} is installed; this backend is for < {below}", fix)
        return None

    return named(f"older_than({key}, {below})", check)


def diffusers_accepts(name: str, key: str, how: str = "") -> Check:
    """diffusers' own requirement check accepts its backend `name` here (the report carries diffusers' verdict,
    see hardware.diffusers_backends): sdcli asks diffusers rather than copy its rules. `key`: the package it
    judged. Every backend with a diffusers name has it, after the checks of its package, which say more
    precisely what is wrong with it."""

    def check(m: Machine, shape: Shape | None) -> Refusal | None:
        refusal = m.diffusers_refusal(name)
        if not refusal:
            return None
        wanted = re.search(r"install `([^`]+)`", refusal)  # `pkg>=x.y`, or in words: "Please build ... from source"
        fix = f"pip install -U '{wanted.group(1)}'{how}" if wanted else refusal.partition("Please ")[2]
        return Refusal(WRONG_VERSION, f"{key} {m.package(key).get('version') or ''} is installed, but diffusers "
                                      f"can't use it: {refusal}", fix)

    return named(f"diffusers_accepts({name})", check)


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



# ----- the declaration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A package a backend needs: how the hardware report finds it, how new it must be, and the fix."""

    key: str                     # its entry in the report's `packages` (and in doctor's table)
    dists: tuple[str, ...]       # distribution names to look up, pip's first (one kernel ships under several)
    module: str                  # what must import
    min_version: str | None = None
    needed_by: str = "diffusers"  # who needs min_version: diffusers' wrapper, or sdcli for a kernel it calls itself
    note: str = ""               # said after the pip command (a build from source, an extra for CUDA 13, ...)
    health: Check | None = None  # a further check of the install (xformers' compiled ops)

    def check(self, m: Machine, shape: Shape | None) -> Refusal | None:
        """Installed, imports, and new enough."""
        pip_name = self.dists[0]
        install = f"pip install '{pip_name}>={self.min_version}'" if self.min_version else f"pip install {pip_name}"
        install += self.note
        info = m.package(self.key)
        if not info.get("version") and not info.get("import_ok"):
            return Refusal(NOT_INSTALLED, f"{pip_name} is not installed", install)
        if self.min_version and info.get("version") and \
                _version_tuple(info["version"]) < _version_tuple(self.min_version):
            return Refusal(WRONG_VERSION, f"{pip_name} {info['version']} is installed; {self.needed_by} needs ≥ "
                                          f"{self.min_version}", install.replace("pip install", "pip install -U", 1))
        if info.get("import_ok") is False:
            return Refusal(BROKEN, f"{pip_name} {info.get('version') or ''} fails to import: {info.get('error')}",
                           f"reinstall it for torch {m.package('torch').get('version')}: {install} --force-reinstall")
        return None

    def same_place(self, other: "Package") -> bool:
        return (self.dists, self.module) == (other.dists, other.module)


# What the hardware report records besides the backends' packages: sdcli's own libraries, and NVML's (after them).
CORE = (Package("torch", ("torch",), "torch"), Package("diffusers", ("diffusers",), "diffusers"),
        Package("transformers", ("transformers",), "transformers"))
NVML = Package("pynvml", ("nvidia-ml-py", "pynvml"), "pynvml")
PLAN_CORE = ("torch", "diffusers")  # the libraries whose versions a measured plan depends on, besides the kernels'


@dataclass
class Backend:
    """One attention backend, declared once: everything sdcli knows of it derives from this."""

    name: str
    summary: str
    kind: str = EXACT
    diffusers_name: str | None = None  # run through diffusers' dispatch_attention_fn under this name
    attention: Callable | None = None  # or this: fn(q, k, v, attn_mask=None, scale=None), (B, S, H, D) layout
    checks: list[Check] = field(default_factory=list)
    package: Package | None = None     # the package it needs (checked first); None: torch's own
    in_auto: bool = True               # whether measured `auto` and `bench` try it (False: slow by design)
    auto_rank: int | None = None       # its place in auto's documented order (--no-tune, --fallback), lowest
                                       # first; None: auto takes it only where measured the fastest
    origin: str = "sdcli"              # or the distribution that registered it
    release: str | None = None         # a plug-in's distribution version (+ a hash of its files if editable)

    @cached_property
    def requirements(self) -> list[Check]:
        """The checks every backend of its sort has, before its own: its package's (installed, imports, new enough,
        healthy; where its own checks list `package.check`, there instead), then, for a diffusers backend,
        diffusers' own requirement check."""
        package = [self.package.check, *([self.package.health] if self.package.health else [])] \
            if self.package and self.package.check not in self.checks else []
        accepts = [diffusers_accepts(self.diffusers_name, self.package.key if self.package else "torch",
                                     self.package.note if self.package else "")] if self.diffusers_name else []
        return package + accepts

    def verdict(self, machine: Machine, shape: Shape | None = None) -> Verdict:
        for check in (*self.requirements, *self.checks):
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


def register(backend: Backend, replace: bool = False) -> Backend:
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    if backend.kind not in (EXACT, QUANTIZED):
        raise ValueError(f"backend kind must be {EXACT!r} or {QUANTIZED!r}, not {backend.kind!r}")
    if (backend.diffusers_name is None) == (backend.attention is None):
        raise ValueError("a backend needs exactly one of diffusers_name or attention")
    if backend.auto_rank is not None and not backend.in_auto:
        raise ValueError(f"{backend.name}: a rank in auto's order needs in_auto")
    known = {p.key: p for p in packages()}
    if backend.package and backend.package.key in known and not backend.package.same_place(known[backend.package.key]):
        raise ValueError(f"{backend.name}: package {backend.package.key!r} is declared elsewhere with other "
                         "distributions or module")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def load_plugins() -> None:
    """Register sdcli's own backends, then those other installed packages declare (plugins.py), the same way.
    A broken plug-in is reported, not fatal."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in plugins.sources():
        try:
            items = plugins.declared(ep.load())
            if not all(isinstance(b, Backend) for b in items):
                raise TypeError(f"{ep.value} gives {', '.join(type(b).__name__ for b in items)}, not sdcli Backends")
            for backend in items:
                if ep.dist is not None:  # a plug-in's (sdcli's own come from no distribution's entry point)
                    if backend.origin == "sdcli":
                        backend.origin = ep.dist.name
                    backend.release = plugins.release(ep)
                register(backend)
        except Exception as exc:
            if ep.dist is None:  # sdcli's own declarations: a bug, not a plug-in's fault
                raise
            _PLUGIN_ERRORS[ep.name] = f"broken plug-in: {error_line(exc)}"


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


# ----- what derives from the registered declarations ----------------------------------------------------------------


def packages() -> list[Package]:
    """Every package the hardware report records (and doctor's table lists): sdcli's core libraries, each registered
    backend's package once, in the order they registered, then NVML's library."""
    seen = {p.key: p for p in CORE}
    for backend in all_backends():
        if backend.package and backend.package.key not in seen:
            seen[backend.package.key] = backend.package
    return [*seen.values(), *([NVML] if NVML.key not in seen else [])]


def plan_versions() -> tuple[str, ...]:
    """The packages whose versions key auto's measured plans: torch, diffusers, and every backend's package."""
    return (*PLAN_CORE, *(p.key for p in packages() if p not in CORE and p is not NVML))


def auto_order(machine: Machine, quantized: bool = False) -> list[str]:
    """The documented order of `--backend auto` without measuring (`--no-tune`, and after a named backend with
    `--fallback`): the backends that declare a rank, lowest first, exact ones only unless quantized ones are asked
    for. On a GPU every ranked backend, whose checks then refuse the layers it can't take and say why. On the CPU
    the ranked backends that run there, less torch's single-kernel SDPA variants: plain SDPA already picks its
    CPU flash kernel, so with sdcli's own backends that is `sdpa` alone."""
    ranked = sorted((b for b in all_backends() if b.auto_rank is not None and (quantized or b.kind == EXACT)),
                    key=lambda b: b.auto_rank)
    if not machine.is_cuda:
        ranked = [b for b in ranked if not (b.diffusers_name or "").startswith("_native_") and b.verdict(machine).usable]
    return [b.name for b in ranked]
