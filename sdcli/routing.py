"""Attention routing at the attention call: every attention call of a routed module goes to the backend its plan
chose for that layer, whatever processor computes the rest, and is counted.

diffusers' processors end in one of two calls: `torch.nn.functional.scaled_dot_product_attention` (SD 1.x/2.x,
SDXL, SD 3, the VAE, IP-Adapter, fused projections: looked up on the module at call time) or diffusers' own
`dispatch_attention_fn` (Flux and the newer transformers: looked up in the processor's module). sdcli puts a
pass-through in front of both, once per process. Routing a model wraps each attention module's `forward` in a
`Site` that says, while it runs, which layer is running: only then does a call go to the router; any other call
goes straight on, untouched. Processors are never replaced, so whatever diffusers, a loader or the user puts on
a routed module (IP-Adapter, fused q/k/v, PAG, a custom one) still has its attention call routed, and `--backend
sdpa` is stock diffusers by construction. A processor that makes neither call (diffusers' `AttnProcessor`,
`SlicedAttnProcessor`, xFormers') is reported for that layer as not routed.

Each layer's plan is made from its static shape (heads, head dim, dtype) when it is routed. The first eager
call with a new sequence length or mask is checked again with the full shape and its kernel's own error is
caught; from then on a call is one dictionary lookup, one count and the kernel. Inside a torch.compile graph
(the caller's own, or sdcli.speed's), the route is chosen while dynamo traces, by the checks alone, and calls add
to one small CPU tensor per router (a Python int would make dynamo recompile per call). A forward that sdcli
compiled (sdcli.speed) counts nothing inside its graph: its calls are counted per forward, outside.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch.compiler import is_compiling
from torch.nn.attention import SDPBackend

from sdcli import backends
from sdcli.backends import Backend, Shape
from sdcli.devices import out_of_memory
from sdcli.errors import RoutingError, error_line
from sdcli.hardware import Machine
from sdcli.numerics import dtype_name

AUTO = "auto"
GRAPH_SLOTS = 8192  # (layer, backend) pairs a router can count inside compiled graphs


@dataclass(eq=False)
class Layer:
    """One attention call site: a module's attention call (or its n-th call in one forward, named `name#n`), its
    plan and the evidence of what served it."""

    name: str
    attention: str  # "self", "cross", or "joint" (image and text tokens in one sequence: SD 3, Flux)
    heads: int | None       # None until the first call, for modules that don't say (planned then)
    head_dim: int | None
    dtype: str
    planned: str | None = None                       # the plan's choice for this layer's static shape; served()
                                                     # says what ran
    refused: dict[str, str] = field(default_factory=dict)  # backend -> why it was passed over
    calls: Counter = field(default_factory=Counter)   # backend -> calls that it served
    shapes: set = field(default_factory=set)          # every full Shape seen, batch included
    kernels: dict[str, str] = field(default_factory=dict)  # backend -> the kernel torch picked, for `sdpa`
    processors: dict = field(default_factory=dict)          # processor classes that ran it, in order (a set)
    last_processor: type | None = field(default=None, repr=False)  # the last one's class: noted once per change
    not_routed: Counter = field(default_factory=Counter)   # why -> forwards or calls sdcli did not route
    routes: dict = field(default_factory=dict, repr=False)  # (q_len, kv_len, masked, dtype) -> Choice
    graph_slots: dict = field(default_factory=dict, repr=False)  # backend -> its slot in the router's graph counts
    graph_counts: object = field(default=None, repr=False)  # the router's tensor of calls in compiled graphs

    def served(self) -> Counter:
        total = Counter(self.calls)
        for name, slot in self.graph_slots.items():
            total[name] += int(self.graph_counts[slot])
        return +total

    def to_json(self) -> dict:
        return {
            "layer": self.name, "kind": self.attention, "heads": self.heads, "head_dim": self.head_dim,
            "dtype": self.dtype, "backend": self.planned, "refused": dict(self.refused),
            "calls": dict(self.served()), "seqs": self.seqs, "kernels": dict(self.kernels),
            "processors": [*self.processors], "not_routed": dict(self.not_routed),
        }

    def shape_of(self, q, k, mask=None) -> Shape:
        """The full shape of one call of this layer, batch included ((batch, seq, heads, head_dim) tensors)."""
        return Shape(self.heads, self.head_dim, q.shape[1], k.shape[1], dtype_name(q.dtype),
                     mask is not None, batch=q.shape[0])

    @property
    def seqs(self) -> list[tuple[int, int]]:
        return sorted({(s.q_len, s.kv_len) for s in self.shapes})


@dataclass(frozen=True)
class Choice:
    """What serves one layer at one shape: the backend (what is counted), and the cheapest eager call that runs
    that backend's kernel on tensors laid out as torch's SDPA takes them (batch, heads, seq, head_dim) and as
    diffusers' dispatcher takes them (batch, seq, heads, head_dim); see eager_calls."""

    backend: Backend
    bhsd: Callable
    bshd: Callable


# ----- what runs now: set by a routed module's forward, read by the two pass-throughs ----------------------------


class Running:
    """What runs now in one thread: the routed module whose forward is running (None: no routed forward, or a kernel
    of sdcli's is running), and how many attention calls it has made so far."""

    def __init__(self):
        self.site: Site | None = None
        self.calls = 0


class PerThread(threading.local):
    """One `Running` per thread, read once per forward and once per call: attributes of a thread-local are five
    times slower to reach than a plain object's."""

    def __init__(self):
        self.running = Running()


THREAD = PerThread()


class Site:
    """Put on an attention module as its `forward`: while the module's own forward runs, its attention calls go to
    `router` for `layer` (its first call) or for `layer#n` (its n-th, e.g. IP-Adapter's image tokens)."""

    def __init__(self, module, router: "Router", layer: Layer, before):
        self.module = module
        self.router = router
        self.layer = layer
        self.before = before  # the module's own `forward` attribute before routing (None: the class's)
        self.forward = before or type(module).forward.__get__(module)

    def __call__(self, *args, **kwargs):
        now = THREAD.running
        outer_site, outer_calls = now.site, now.calls
        now.site, now.calls = self, 0
        try:
            return self.forward(*args, **kwargs)
        finally:
            calls = now.calls
            now.site, now.calls = outer_site, outer_calls
            processor = type(self.module.processor)
            if processor is not self.layer.last_processor or not calls:  # else nothing new to note
                self.router.ran(self.layer, processor, calls)

    def attend(self, now: Running, q, k, v, mask, scale, bhsd: bool):
        """One attention call of this module, to the router; the kernel's own SDPA calls pass through."""
        index = now.calls
        now.calls = index + 1
        now.site = None
        try:
            return self.router.attend(self.layer, index, q, k, v, mask, scale, bhsd)
        finally:
            now.site = self

    def passes(self, now: Running, why: str) -> None:
        """An attention call with arguments sdcli does not route: it runs as asked, and the layer says so."""
        now.calls += 1
        self.router.passed(self.layer, why)


_SDPA = torch.nn.functional.scaled_dot_product_attention  # torch's own, whatever is installed in its place later


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    now = THREAD.running
    site = now.site
    if site is not None:
        if not (dropout_p or is_causal or enable_gqa):
            return site.attend(now, query, key, value, attn_mask, scale, True)
        site.passes(now, "dropout, a causal mask or grouped heads: torch's SDPA as called")
    return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 enable_gqa=enable_gqa)


scaled_dot_product_attention.__doc__ = f"sdcli's pass-through (routes calls of routed layers).\n\n{_SDPA.__doc__}"


def diverted(dispatch: Callable) -> Callable:
    """diffusers' dispatch_attention_fn, with the calls of routed layers sent to their router."""

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        now = THREAD.running
        site = now.site
        if site is not None:
            if not (dropout_p or is_causal or enable_gqa or attention_kwargs or parallel_config):
                return site.attend(now, query, key, value, attn_mask, scale, False)
            site.passes(now, "dropout, a causal mask, grouped heads or backend arguments: diffusers' dispatcher as "
                             "called")
        return dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                        backend=backend, parallel_config=parallel_config)

    dispatch_attention_fn.diffusers_dispatch = dispatch
    return dispatch_attention_fn


SITES: "weakref.WeakSet[Site]" = weakref.WeakSet()  # every routed module's Site, for putting the pass-throughs back


def install_pass_throughs() -> None:
    """Put the pass-throughs in front of torch's SDPA and of diffusers' dispatcher wherever a loaded diffusers module
    calls it (processors look both up at call time). Idempotent. A diffusers module loaded later calls the
    dispatcher undiverted: its native backend still reaches torch's SDPA, and so the router."""
    torch.nn.functional.scaled_dot_product_attention = scaled_dot_product_attention
    for name, module in list(sys.modules.items()):
        if name.startswith("diffusers.") and module is not None:
            divert(module)


def divert(module) -> None:
    dispatch = getattr(module, "dispatch_attention_fn", None)
    if dispatch is not None and not hasattr(dispatch, "diffusers_dispatch"):
        module.dispatch_attention_fn = diverted(dispatch)


def remove_pass_throughs() -> None:
    torch.nn.functional.scaled_dot_product_attention = _SDPA
    for name, module in list(sys.modules.items()):
        dispatch = getattr(module, "dispatch_attention_fn", None) if name.startswith("diffusers.") else None
        if hasattr(dispatch, "diffusers_dispatch"):
            module.dispatch_attention_fn = dispatch.diffusers_dispatch


# ----- the router ---------------------------------------------------------------------------------------------------

ROUTERS: "weakref.WeakValueDictionary[int, Router]" = weakref.WeakValueDictionary()  # id -> router, for graphs


class Router:
    """Chooses and counts. `chain` is the order to try per layer; `strict` means only chain[0] may serve.
    `preferred` (Shape.key -> backend name) puts a measured choice first; `measure(shape, machine)`, if given,
    is asked for that choice at a shape the plan does not cover, at its first call (sdcli.tuning.fastest).
    `counting` is switched off by sdcli.speed while a forward it compiled runs: it counts those calls itself,
    outside the graph."""

    def __init__(self, chain: list[Backend], machine: Machine, strict: bool, requested: str,
                 preferred: dict | None = None, measure=None):
        self.chain = chain
        self.machine = machine
        self.strict = strict
        self.requested = requested
        self.preferred = preferred or {}
        self.measure = measure
        self.layers: list[Layer] = []
        self.by_name: dict[str, Layer] = {}
        self.counting = True
        with torch.inference_mode(False):  # a normal tensor: updated in place in and out of inference mode
            self.graph_counts = torch.zeros(GRAPH_SLOTS, dtype=torch.int64)
        self.graph_slots_used = 0
        ROUTERS[id(self)] = self

    @classmethod
    def for_request(cls, requested: str, machine: Machine, fallback: bool | str = False, quantized: bool = False,
                    preferred: dict | None = None, measure=None) -> "Router":
        """`auto`, or one backend name, for the device of `machine`: strict, or with `fallback` followed by auto's
        order (True) or by the one backend named there (e.g. compare's reference)."""
        if requested == AUTO:
            names = backends.auto_order(machine, quantized)
        else:
            first = backends.get(requested)
            if first.kind == backends.QUANTIZED:
                quantized = True  # naming a quantized backend is the opt-in
            rest = ([fallback] if isinstance(fallback, str) else
                    backends.auto_order(machine, quantized) if fallback else [])
            names = [requested] + [n for n in rest if n != requested]
        registered = {b.name: b for b in backends.all_backends()}
        chain = [registered[n] for n in names if n in registered]
        return cls(chain, machine, strict=requested != AUTO and not fallback, requested=requested,
                   preferred=preferred, measure=measure)

    def fresh(self) -> "Router":
        """A router for the same request with no layers and no counts (e.g. for a warm-up)."""
        return type(self)(self.chain, self.machine, self.strict, self.requested, self.preferred, self.measure)

    # ----- planning -------------------------------------------------------------------------------------

    def plan(self, name: str, attention: str, heads: int | None, head_dim: int | None, dtype: str, device) -> Layer:
        """A new layer, planned for its static shape (when known: else at its first call)."""
        layer = Layer(name, attention, heads, head_dim, dtype, graph_counts=self.graph_counts)
        if heads is not None:
            self._settle(layer, heads, head_dim, device)
        self.layers.append(layer)
        self.by_name[name] = layer
        return layer

    def _settle(self, layer: Layer, heads: int, head_dim: int, device) -> None:
        """Plan `layer` for its static shape: the first backend of the chain that takes it."""
        layer.heads, layer.head_dim = heads, head_dim
        shape = Shape(heads, head_dim, dtype=layer.dtype)
        machine = self._machine(device)
        for backend in self.chain:
            verdict = backend.verdict(machine, shape)
            if verdict.usable:
                layer.planned = backend.name
                return
            self._refuse(layer, backend, verdict.reason)
        raise self._no_backend(layer, f"({shape})")

    def plan_module(self, name: str, module) -> Layer:
        """The layer of an attention module: heads and head dim from the module where it says (diffusers'
        `Attention` and most newer classes), else from its first call."""
        weight = next(module.parameters(), None)
        heads, inner = getattr(module, "heads", None), getattr(module, "inner_dim", None)
        known = isinstance(heads, int) and isinstance(inner, int) and heads > 0 and inner % heads == 0
        return self.plan(name, kind_of(module), heads if known else None, inner // heads if known else None,
                         dtype_name(weight.dtype) if weight is not None else "fp32",
                         weight.device if weight is not None else "cpu")

    def call_site(self, layer: Layer, index: int, heads: int, head_dim: int, dtype, q_len: int, kv_len: int,
                  device) -> Layer:
        """The layer of a module's `index`-th attention call in one forward: its first call is the module's own
        layer; others (IP-Adapter's image tokens, a processor's second attention) are layers of their own."""
        if index == 0:
            if layer.planned is None:
                self._settle(layer, heads, head_dim, device)
            return layer
        name = f"{layer.name}#{index + 1}"
        return self.by_name.get(name) or self.plan(name, "self" if q_len == kv_len else "cross", heads, head_dim,
                                                   dtype_name(dtype), device)

    def _machine(self, device) -> Machine:
        where = str(device)
        return self.machine if where == self.machine.device else Machine(self.machine.report, where)

    def _refuse(self, layer: Layer, backend: Backend, reason: str) -> None:
        """`backend` can't take `layer` (at a shape): noted, and the end of a strict request."""
        layer.refused.setdefault(backend.name, reason)
        if self.strict:
            raise self._cannot_serve(layer, backend.name, reason)

    def _no_backend(self, layer: Layer, where: str) -> RoutingError:
        return RoutingError(f"no backend can serve layer {layer.name} {where}: "
                            + "; ".join(f"{b}: {r}" for b, r in layer.refused.items()))

    def _cannot_serve(self, layer: Layer, backend: str, reason: str) -> RoutingError:
        return RoutingError(f"backend {backend} can't serve layer {layer.name} "
                            f"({layer.attention}-attention, {layer.heads}×{layer.head_dim} {layer.dtype}): {reason}",
                            remedy=("Use --backend auto, or add --fallback to let other backends take such layers",
                                    'Use backend="auto", or fallback=True to let other backends take such layers'))

    # ----- the hot path -------------------------------------------------------------------------------

    def attend(self, layer: Layer, index: int, q, k, v, mask, scale, bhsd: bool):
        """One attention call of `layer`'s module (its `index`-th in this forward), with q/k/v laid out as torch's
        SDPA takes them (`bhsd`) or as diffusers' dispatcher does."""
        if is_compiling():
            return self._traced(layer.name, index, q, k, v, mask, scale, bhsd)
        seq = 2 if bhsd else 1
        if index:
            layer = self.call_site(layer, index, q.shape[3 - seq], q.shape[-1], q.dtype, q.shape[seq],
                                   k.shape[seq], q.device)
        choice = layer.routes.get((q.shape[seq], k.shape[seq], mask is not None, q.dtype))
        if choice is None:
            if layer.planned is None:  # a module that did not say its heads: planned at its first call
                self._settle(layer, q.shape[3 - seq], q.shape[-1], q.device)
            return self._first_call(layer, q, k, v, mask, scale, bhsd)
        if self.counting:
            layer.calls[choice.backend.name] += 1
        return (choice.bhsd if bhsd else choice.bshd)(q, k, v, mask, scale)

    def _first_call(self, layer: Layer, q, k, v, mask, scale, bhsd: bool):
        """Check a new shape against each candidate, try its kernel, keep the first that works."""
        q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v)) if bhsd else (q, k, v)  # (batch, seq, heads, dim)
        shape = layer.shape_of(q4, k4, mask)
        layer.shapes.add(shape)
        for backend in self._passing(layer, shape, self._machine(q.device)):
            try:
                choice = eager_calls(backend, q4, k4, v4, mask)
                out = (choice.bhsd if bhsd else choice.bshd)(q, k, v, mask, scale)
            except Exception as exc:
                if out_of_memory(exc):
                    raise  # a full device is not the kernel's fault; the caller decides (bench searches batch sizes)
                self._refuse(layer, backend, f"the kernel failed: {error_line(exc)} (at {shape})")
            else:
                layer.routes[(shape.q_len, shape.kv_len, shape.mask, q.dtype)] = choice
                if backend.diffusers_name == "native":
                    layer.kernels[backend.name] = sdpa_kernel_choice(q4, k4, v4, mask)
                if self.counting:
                    layer.calls[backend.name] += 1
                return out
        raise self._no_backend(layer, f"at {shape}")

    def _passing(self, layer: Layer, shape: Shape, machine: Machine):
        """The candidates for `shape` whose checks pass, in order; each that fails is refused on the way."""
        for backend in self._candidates(layer, shape, machine):
            verdict = backend.verdict(machine, shape)
            if verdict.usable:
                yield backend
            else:
                self._refuse(layer, backend, f"{verdict.reason} (at {shape})")

    def _candidates(self, layer: Layer, shape: Shape, machine: Machine) -> list[Backend]:
        """The chain from the layer's plan on, with the measured fastest for this shape first."""
        start = [b.name for b in self.chain].index(layer.planned)
        candidates = self.chain[start:]
        if self.measure and shape.key not in self.preferred:
            self.preferred[shape.key] = self.measure(shape, machine)
        if self.preferred.get(shape.key):
            best = backends.get(self.preferred[shape.key])
            candidates = [best] + [b for b in candidates if b is not best]
        return candidates

    def _traced(self, name: str, index: int, q, k, v, mask, scale, bhsd: bool):
        """A call inside a torch.compile graph: the route is chosen while dynamo traces (by the checks alone, no
        kernel is tried), and the call adds to its slot of the router's counts."""
        seq = 2 if bhsd else 1
        backend_name, slot = _trace_route(id(self), name, index, int(q.shape[3 - seq]), int(q.shape[-1]),
                                          int(q.shape[seq]), int(k.shape[seq]), mask is not None, q.dtype,
                                          str(q.device))
        if self.counting:
            self.graph_counts[slot].add_(1)
        return own_call(backends.get(backend_name).call, q, k, v, mask, scale, bhsd)

    def trace_route(self, name: str, index: int, heads: int, head_dim: int, q_len: int, kv_len: int, masked: bool,
                    dtype, device: str) -> tuple[str, int]:
        """While dynamo traces: the backend for this call (an eager route if there is one, else the first candidate
        whose checks pass) and the layer's counting slot for it."""
        layer = self.call_site(self.by_name[name], index, heads, head_dim, dtype, q_len, kv_len, device)
        route = layer.routes.get((q_len, kv_len, masked, dtype))
        shape = Shape(heads, head_dim, q_len, kv_len, dtype_name(dtype), masked)
        layer.shapes.add(shape)
        backend = route.backend if route is not None else next(self._passing(layer, shape, self._machine(device)), None)
        if backend is None:
            raise self._no_backend(layer, f"at {shape}")
        backend.call  # resolved now, eagerly: dynamo can't trace the lock a cached_property takes the first time
        if backend.name not in layer.graph_slots:
            if self.graph_slots_used == GRAPH_SLOTS:
                raise RoutingError(f"more than {GRAPH_SLOTS} layer-backend pairs in compiled graphs")
            layer.graph_slots[backend.name] = self.graph_slots_used
            self.graph_slots_used += 1
        return backend.name, layer.graph_slots[backend.name]

    def ran(self, layer: Layer, processor: type, calls: int) -> None:
        """A forward of `layer`'s module ran `processor` (a new one, or one that made no attention call sdcli saw)."""
        if is_compiling():  # noted while dynamo traces; `last_processor` is left alone, so no guard on it fails
            _trace_ran(id(self), layer.name, processor.__name__, calls)
        elif self.counting:
            layer.last_processor = processor
            layer.processors[processor.__name__] = None
            if not calls:
                layer.not_routed[no_call(processor.__name__)] += 1

    def passed(self, layer: Layer, why: str) -> None:
        if is_compiling():
            _trace_passed(id(self), layer.name, why)
        elif self.counting:
            layer.not_routed[why] += 1

    # ----- evidence ---------------------------------------------------------------------------------------

    def reset_counts(self) -> None:
        """Forget calls so far (a warm-up's), keeping the routes and which processors ran."""
        for layer in self.layers:
            layer.calls.clear()
            layer.not_routed.clear()
        self.graph_counts.zero_()  # in place: a compiled graph holds on to this very tensor

    def counts(self) -> Counter:
        """(layer index, backend) -> calls so far; two snapshots' difference is what happened in between."""
        return Counter({(i, name): n for i, layer in enumerate(self.layers) for name, n in layer.calls.items()})

    def add(self, counts: Counter) -> None:
        """Add calls made where they could not be counted one by one (inside a compiled graph)."""
        for (i, name), n in counts.items():
            self.layers[i].calls[name] += n

    def served(self) -> Counter:
        """Calls per backend over all layers: what actually ran."""
        total = Counter()
        for layer in self.layers:
            total.update(layer.served())
        return total

    def fallbacks(self) -> list[dict]:
        """Layers a named backend could not serve, and why. `auto` has no fallbacks: it reports its plan."""
        if self.requested == AUTO:
            return []
        first = self.chain[0].name
        return [{"layer": l.name, "backend": ", ".join(l.served()) or l.planned, "instead_of": first,
                 "why": l.refused.get(first, "")}
                for l in self.layers if first in l.refused]

    def not_routed(self) -> list[dict]:
        """Layers whose forward ran without a routed call (their processor computes attention itself), or made
        calls sdcli passed on as asked."""
        return [{"layer": l.name, "processors": [*l.processors], "why": dict(l.not_routed)}
                for l in self.layers if l.not_routed]

    def groups(self) -> list[dict]:
        """Layers grouped by what decides the kernel: part, kind, heads×head_dim, dtype."""
        groups: dict[tuple, dict] = {}
        for l in self.layers:
            key = (l.name.split(".")[0], l.attention, l.heads, l.head_dim, l.dtype)
            g = groups.setdefault(key, {"part": key[0], "kind": l.attention, "heads": l.heads, "head_dim": l.head_dim,
                                        "dtype": l.dtype, "layers": 0, "calls": Counter(), "seqs": set(),
                                        "refused": {}, "kernels": {}, "processors": {}, "not_routed": Counter(),
                                        "not_reached": 0})
            g["layers"] += 1
            g["calls"].update(l.served())
            g["seqs"] |= set(l.seqs)
            g["refused"].update(l.refused)
            g["kernels"].update(l.kernels)
            g["processors"].update(l.processors)
            g["not_routed"].update(l.not_routed)
            g["not_reached"] += not (l.processors or l.served())
        return [{**g, "calls": dict(g["calls"]), "seqs": sorted(g["seqs"]), "processors": [*g["processors"]],
                 "not_routed": dict(g["not_routed"])} for g in groups.values()]

    def to_json(self) -> dict:
        return {"requested": self.requested, "strict": self.strict, "chain": [b.name for b in self.chain],
                "served": dict(self.served()), "groups": self.groups(), "fallbacks": self.fallbacks(),
                "not_routed": self.not_routed(), "layers": [l.to_json() for l in self.layers]}


def no_call(processor: str) -> str:
    return f"{processor} computes attention itself (no SDPA or dispatcher call): not routed"


# Run while dynamo traces, outside the graph (their results are constants of the graph): choosing a route and noting
# what ran can't be traced, and must not be a graph break (torch.compile(fullgraph=True) refuses those).
@torch._dynamo.assume_constant_result
def _trace_route(router: int, *args) -> tuple[str, int]:
    return ROUTERS[router].trace_route(*args)


@torch._dynamo.assume_constant_result
def _trace_ran(router: int, name: str, processor: str, calls: int) -> None:
    """A compiled graph of `name`'s module runs `processor`, which makes `calls` attention calls sdcli sees."""
    layer = ROUTERS[router].by_name[name]
    layer.processors[processor] = None
    if not calls:
        layer.not_routed[f"{no_call(processor)} (in a compiled graph: counted once)"] += 1


@torch._dynamo.assume_constant_result
def _trace_passed(router: int, name: str, why: str) -> None:
    ROUTERS[router].by_name[name].not_routed[why] += 1


class CapturingRouter(Router):
    """A router that keeps the inputs of each layer's first call (`sdcli compare` replays them through every
    backend; auto's tuner judges kernels on them), laid out (batch, seq, heads, head_dim)."""

    samples: int | None = None  # keep only that many batch items (None: all)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured: dict[str, tuple] = {}  # layer name -> (q, k, v, mask)

    def attend(self, layer, index, q, k, v, mask, scale, bhsd):
        name = layer.name if not index else f"{layer.name}#{index + 1}"
        if name not in self.captured and not is_compiling():
            keep = slice(0, self.samples)
            qkv = (t.transpose(1, 2) for t in (q, k, v)) if bhsd else (q, k, v)
            self.captured[name] = tuple(None if t is None else t[keep].detach().clone() for t in (*qkv, mask))
        return super().attend(layer, index, q, k, v, mask, scale, bhsd)


def sdpa_kernel_choice(q, k, v, mask) -> str:
    """Which kernel plain SDPA picks for these (batch, seq, heads, head_dim) tensors (torch's own chooser)."""
    try:
        choice = torch._fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return SDPBackend(choice).name.lower()
    except Exception:
        return "unknown"


def _sdpa(q, k, v, mask, scale):
    return _SDPA(q, k, v, attn_mask=mask, scale=scale)


def own_call(call, q, k, v, mask, scale, bhsd: bool):
    """A backend's own function, which takes the dispatcher's layout (batch, seq, heads, head_dim), on q/k/v laid
    out either way (`bhsd`: as torch's SDPA takes them)."""
    if not bhsd:
        return call(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None and mask.ndim == 2:  # SDPA's (q, kv) mask, in the shape the other layout broadcasts
        mask = mask[None, None]
    return call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale).transpose(1, 2)


def on_bshd(sdpa_call):
    """An SDPA call (q, k, v, mask, scale) for q/k/v in the dispatcher's layout: the two differ by dims 1 and 2."""
    return lambda q, k, v, mask, scale: sdpa_call(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale).transpose(1, 2)


def eager_calls(backend: Backend, q, k, v, mask) -> Choice:
    """The cheapest eager calls that run `backend`'s kernel on tensors like these ((batch, seq, heads, head_dim)).

    torch's SDPA is called directly on SDPA's layout: `sdpa` is then stock's very call. diffusers' single-kernel
    SDPA backends (`sdpa-flash`, ...) wrap every call in torch.nn.attention.sdpa_kernel, which costs more host time
    than the rest of the call (docs/benchmarks.md). Where plain SDPA picks that kernel anyway, the plain call runs
    it without any switch; otherwise only the kernels SDPA would pick first are switched off around it. torch's
    own chooser (torch._fused_sdp_choice) says which those are and confirms the kernel, once per route. Every
    other backend gets its own function, in the dispatcher's layout."""
    bhsd, bshd = partial(own_call, backend.call, bhsd=True), partial(own_call, backend.call, bhsd=False)
    if backend.diffusers_name == "native":
        return Choice(backend, _sdpa, bshd)
    kernel = SDPA_KERNELS.get(backend.diffusers_name)
    if kernel is None:
        return Choice(backend, bhsd, bshd)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    switches = []  # torch._C._set_sdp_use_<kernel> of each kernel that SDPA would pick before this one
    try:
        while (choice := torch._fused_sdp_choice(qt, kt, vt, mask)) != kernel:
            if choice not in SDPA_SWITCHES:
                return Choice(backend, bhsd, bshd)
            switches.append(getattr(torch._C, SDPA_SWITCHES[choice]))
            switches[-1](False)
    except Exception:  # no kernel left that takes these tensors, or no chooser for their device (meta)
        return Choice(backend, bhsd, bshd)
    finally:
        for switch in switches:
            switch(True)
    if not switches:
        return Choice(backend, _sdpa, on_bshd(_sdpa))

    def switched(q, k, v, mask, scale):
        for switch in switches:
            switch(False)
        try:
            return _sdpa(q, k, v, mask, scale)
        finally:
            for switch in switches:
                switch(True)

    return Choice(backend, switched, on_bshd(switched))


# diffusers' single-kernel SDPA backends -> torch's number for that kernel; that number -> the kernel's switch
SDPA_KERNELS = {name: int(getattr(SDPBackend, kernel)) for name, kernel in (
    ("_native_flash", "FLASH_ATTENTION"), ("_native_efficient", "EFFICIENT_ATTENTION"),
    ("_native_cudnn", "CUDNN_ATTENTION"), ("_native_math", "MATH"))}
SDPA_SWITCHES = {int(getattr(SDPBackend, kernel)): f"_set_sdp_use_{switch}" for kernel, switch in (
    ("FLASH_ATTENTION", "flash"), ("EFFICIENT_ATTENTION", "mem_efficient"), ("CUDNN_ATTENTION", "cudnn"),
    ("MATH", "math"), ("OVERRIDEABLE", "overrideable"))}


# ----- which modules, and routing them -------------------------------------------------------------------------------


def attention_classes() -> tuple[type, ...]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return Attention, AttentionModuleMixin


def kind_of(module) -> str:
    if getattr(module, "is_cross_attention", False):
        return "cross"
    return "joint" if getattr(module, "added_kv_proj_dim", None) is not None else "self"


def attention_models(target) -> dict[str, torch.nn.Module]:
    """Every model of a pipeline that has diffusers attention modules (denoiser, VAE, ControlNets, priors, refiners:
    whatever `pipe.components` holds) by component name, the one with the most first (the denoiser, in every
    pipeline tried); a model on its own is {"model": it}."""
    if isinstance(target, torch.nn.Module):
        parts = {"model": target}
    else:
        parts = getattr(target, "components", None) or vars(target)
    kinds = attention_classes()
    counts = {name: sum(isinstance(m, kinds) for m in part.modules()) for name, part in parts.items()
              if isinstance(part, torch.nn.Module)}
    return {name: parts[name] for name in sorted((n for n in counts if counts[n]), key=lambda n: -counts[n])}


def attention_modules(target):
    """(layer name, module) for every diffusers attention module of every model in `target`."""
    kinds = attention_classes()
    for part, model in attention_models(target).items():
        for name, module in model.named_modules():
            if isinstance(module, kinds):
                yield f"{part}.{name}" if name else part, module


def site_of(module) -> Site | None:
    site = module.__dict__.get("forward")
    return site if isinstance(site, Site) else None


def router_of(module) -> Router | None:
    """The router that serves `module`'s attention, or None where sdcli has not routed it."""
    site = site_of(module)
    return site.router if site else None


def route(target, router: Router) -> Router:
    """Route every attention module of `target` (a pipeline, or one model) to `router`. Routing again replaces the
    router; nothing is wrapped twice. Every layer is planned before any is routed, so a refusal changes nothing."""
    modules = list(attention_modules(target))
    planned = [(module, router.plan_module(name, module)) for name, module in modules]
    install_pass_throughs()
    for module, layer in planned:
        site = site_of(module)
        if site is None:
            site = Site(module, router, layer, module.__dict__.get("forward"))
            module.forward = site
            SITES.add(site)
        site.router, site.layer = router, layer
    return router


def unwrap(module, site: Site) -> None:
    """Give a routed module the forward it had before sdcli routed it."""
    SITES.discard(site)
    if site.before is None:
        del module.forward
    else:
        module.forward = site.before


def unroute(target) -> None:
    """Give every routed module of `target` the forward it had before; with no routed module left anywhere, put
    torch's SDPA and diffusers' dispatcher back too."""
    restore(target, {})


def snapshot(target) -> dict:
    """Which router serves each attention module of `target` now, to put back with restore()."""
    return {module: (site.router, site.layer) for _, module in attention_modules(target) if (site := site_of(module))}


def restore(target, saved: dict) -> None:
    """Route each attention module of `target` as `saved` says (a snapshot), and un-route the others."""
    for _, module in attention_modules(target):
        site = site_of(module)
        if site is not None and module in saved:
            site.router, site.layer = saved[module]
        elif site is not None:
            unwrap(module, site)
    if not len(SITES):
        remove_pass_throughs()


def seen_shapes(router: Router) -> list[Shape]:
    """The distinct attention shapes a run met (batch included), biggest first: the model's real shapes."""
    shapes = {s for layer in router.layers for s in layer.shapes}
    return sorted(shapes, key=lambda s: (-(s.batch or 1) * s.heads * s.q_len * s.kv_len * s.head_dim, str(s)))
