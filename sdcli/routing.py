"""Attention routing: each attention layer of the denoiser and VAE sent to the backend its plan chose.

diffusers' SD/SDXL UNet, SD 3's transformer and the VAE call F.scaled_dot_product_attention directly
and ignore diffusers' own backend switch (docs/design.md). So sdcli puts its own processor on each of
their `Attention` modules: `RoutedAttnProcessor` computes q/k/v exactly as `AttnProcessor2_0` does,
`RoutedJointAttnProcessor` as SD 3's `JointAttnProcessor2_0`, and both hand the attention call to the
backend the plan chose for that layer. Flux's processors already call diffusers' dispatcher; sdcli
keeps them and routes that call (see `Route`). Every call is counted per layer and backend: that
count, not the request, is what sdcli reports as having run.

A plan is made per layer from its static shape (heads, head dim, dtype) when the processors are
installed. The first call with a new sequence length or mask is checked again with the full shape,
and its kernel's own error is caught; that call always runs eagerly, never inside a torch.compile
graph. From then on a call is one dictionary lookup, one count and the kernel. A forward that sdcli
compiled (sdcli.speed) counts nothing inside its graph: its calls are counted per forward, outside.
Inside a graph of the caller's own torch.compile, calls add to a small CPU tensor per layer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.compiler import is_compiling
from torch.nn.attention import SDPBackend

from sdcli import SdcliError, backends, error_line, families
from sdcli.backends import Backend, Shape
from sdcli.hardware import Machine
from sdcli.numerics import dtype_name

AUTO = "auto"


class RoutingError(SdcliError):
    exit_code = 1


def auto_order(machine: Machine, quantized: bool = False) -> list[str]:
    """The documented preference of `--backend auto`, fastest-first by what is known of each GPU generation.
    Exact kernels only, unless quantized ones are asked for; `sdpa` always ends the list and runs anywhere."""
    if not machine.is_cuda:
        order = ["sdpa"]  # on the CPU torch's SDPA already picks its flash kernel
    else:
        order = ["flash-attn-3", "flash-attn", "sdpa-flash", "xformers", "sdpa-cudnn", "sdpa-efficient", "sdpa"]
    if quantized:
        order = ["sage-fp8-sm90", "sage-fp8", "sage", "sage1"] + order
    return order


@dataclass
class Layer:
    """One attention module, its plan and the evidence of what served it."""

    name: str
    attention: str  # "self", "cross", or "joint" (image and text tokens in one sequence: SD 3, Flux)
    heads: int
    head_dim: int
    dtype: str
    planned: str | None = None                       # the plan's choice for this layer's static shape; served()
                                                     # says what ran
    refused: dict[str, str] = field(default_factory=dict)  # backend -> why it was passed over
    calls: Counter = field(default_factory=Counter)   # backend -> calls that it served
    shapes: set = field(default_factory=set)          # every full Shape seen, batch included
    kernels: dict[str, str] = field(default_factory=dict)  # backend -> the kernel torch picked, for `sdpa`
    routes: dict = field(default_factory=dict, repr=False)  # (q_len, kv_len, masked, dtype) -> Choice
    # Calls inside a graph of the caller's own torch.compile (sdcli's --compile counts outside its graphs): a Python
    # int would make dynamo recompile per call, so they add to a 0-d CPU tensor per backend (no device sync to read)
    graph_calls: dict = field(default_factory=dict, repr=False)  # backend -> 0-d int64 CPU tensor
    fused: bool = False  # diffusers' fused q/k/v projections (to_qkv, to_kv)

    def served(self) -> Counter:
        total = Counter(self.calls)
        for name, count in self.graph_calls.items():
            total[name] += int(count)
        return +total

    def to_json(self) -> dict:
        return {
            "layer": self.name, "kind": self.attention, "heads": self.heads, "head_dim": self.head_dim,
            "dtype": self.dtype, "backend": self.planned, "refused": dict(self.refused),
            "calls": dict(self.served()), "seqs": self.seqs, "kernels": dict(self.kernels),
        }

    def shape_of(self, q, k, mask=None) -> Shape:
        """The full shape of one call of this layer, batch included."""
        return Shape(self.heads, self.head_dim, q.shape[1], k.shape[1], dtype_name(q.dtype),
                     mask is not None, batch=q.shape[0])

    @property
    def seqs(self) -> list[tuple[int, int]]:
        return sorted({(s.q_len, s.kv_len) for s in self.shapes})


@dataclass(frozen=True)
class Choice:
    """What serves one layer at one shape: the backend (what is counted), and the cheapest eager call that
    runs that backend's kernel (see eager_call). Inside a compiled graph the backend's own function is traced."""

    backend: Backend
    eager: Callable


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
        self.counting = True

    @classmethod
    def for_request(cls, requested: str, report: dict, device: str, fallback: bool | str = False,
                    quantized: bool = False, preferred: dict | None = None, measure=None) -> "Router":
        """`auto`, or one backend name: strict, or with `fallback` followed by auto's order (True) or by the one
        backend named there (e.g. compare's reference)."""
        machine = Machine(report, device)
        if requested == AUTO:
            names = auto_order(machine, quantized)
        else:
            first = backends.get(requested)  # KeyError names the known ones
            if first.kind == backends.QUANTIZED:
                quantized = True  # naming a quantized backend is the opt-in
            rest = [fallback] if isinstance(fallback, str) else auto_order(machine, quantized) if fallback else []
            names = [requested] + [n for n in rest if n != requested]
        registered = {b.name: b for b in backends.all_backends()}
        chain = [registered[n] for n in names if n in registered]
        return cls(chain, machine, strict=requested != AUTO and not fallback, requested=requested,
                   preferred=preferred, measure=measure)

    def fresh(self) -> "Router":
        """A router for the same request with no layers and no counts (e.g. for a warm-up)."""
        return Router(self.chain, self.machine, self.strict, self.requested, self.preferred, self.measure)

    # ----- planning -------------------------------------------------------------------------------------

    def plan(self, name: str, attn, attention: str) -> Layer:
        weight = attn.to_q.weight if hasattr(attn, "to_q") else attn.to_qkv.weight
        heads = attn.heads
        head_dim = attn.inner_dim // heads
        layer = Layer(name, attention, heads, head_dim, dtype_name(weight.dtype),
                      fused=getattr(attn, "fused_projections", False))
        shape = Shape(heads, head_dim, dtype=layer.dtype)
        machine = self._machine(weight.device)
        for backend in self.chain:
            verdict = backend.verdict(machine, shape)
            if verdict.usable:
                layer.planned = backend.name
                break
            layer.refused[backend.name] = verdict.reason
            if self.strict:
                raise self._cannot_serve(layer, backend.name, verdict.reason)
        if layer.planned is None:
            raise RoutingError(f"no backend can serve layer {name} ({shape}): "
                               + "; ".join(f"{b}: {r}" for b, r in layer.refused.items()))
        self.layers.append(layer)
        return layer

    def _machine(self, device) -> Machine:
        where = str(device)
        return self.machine if where == self.machine.device else Machine(self.machine.report, where)

    def _cannot_serve(self, layer: Layer, backend: str, reason: str) -> RoutingError:
        return RoutingError(f"backend {backend} can't serve layer {layer.name} "
                            f"({layer.attention}-attention, {layer.heads}×{layer.head_dim} {layer.dtype}): {reason}. "
                            "Use --backend auto, or add --fallback to let other backends take such layers")

    # ----- the hot path -------------------------------------------------------------------------------

    def attend(self, layer: Layer, q, k, v, mask=None):
        choice = layer.routes.get((q.shape[1], k.shape[1], mask is not None, q.dtype))
        if choice is None:
            return self._first_call(layer, q, k, v, mask)
        if not is_compiling():
            if self.counting:
                layer.calls[choice.backend.name] += 1
            return choice.eager(q, k, v, attn_mask=mask)
        if self.counting:  # a graph of the caller's own torch.compile
            layer.graph_calls[choice.backend.name].add_(1)
        return choice.backend.call(q, k, v, attn_mask=mask)

    @torch.compiler.disable  # tries kernels inside try/except: never traced, so never a graph break or a guard
    def _first_call(self, layer: Layer, q, k, v, mask):
        """Check a new shape against each candidate, try its kernel, keep the first that works."""
        shape = layer.shape_of(q, k, mask)
        layer.shapes.add(shape)
        machine = self._machine(q.device)
        start = [b.name for b in self.chain].index(layer.planned)
        candidates = self.chain[start:]
        if self.measure and shape.key not in self.preferred:
            self.preferred[shape.key] = self.measure(shape, machine)
        if self.preferred.get(shape.key):  # measured fastest for this shape: try it first
            best = backends.get(self.preferred[shape.key])
            candidates = [best] + [b for b in candidates if b is not best]
        for backend in candidates:
            verdict = backend.verdict(machine, shape)
            reason = verdict.reason
            if verdict.usable:
                try:
                    out = backend.run(q, k, v, attn_mask=mask)
                    layer.routes[(q.shape[1], k.shape[1], mask is not None, q.dtype)] = \
                        Choice(backend, eager_call(backend, q, k, v, mask))
                    if backend.diffusers_name == "native":
                        layer.kernels[backend.name] = sdpa_kernel_choice(q, k, v, mask)
                    if backend.name not in layer.graph_calls:
                        with torch.inference_mode(False):  # a normal tensor: in place in and out of inference mode
                            layer.graph_calls[backend.name] = torch.zeros((), dtype=torch.int64)
                    if self.counting:
                        layer.calls[backend.name] += 1
                    return out
                except torch.OutOfMemoryError:
                    raise  # a full GPU is not the kernel's fault; the caller decides (bench searches batch sizes)
                except Exception as exc:
                    reason = f"the kernel failed: {error_line(exc)}"
            layer.refused.setdefault(backend.name, f"{reason} (at {shape})")
            if self.strict:
                raise self._cannot_serve(layer, backend.name, f"{reason} (at {shape})")
        raise RoutingError(f"no backend can serve layer {layer.name} at {shape}: "
                           + "; ".join(f"{b}: {r}" for b, r in layer.refused.items()))

    # ----- evidence ---------------------------------------------------------------------------------------

    def reset_counts(self) -> None:
        """Forget calls so far (a warm-up's), keeping the routes."""
        for layer in self.layers:
            layer.calls.clear()
            for count in layer.graph_calls.values():
                count.zero_()  # in place: a compiled graph holds on to these very tensors

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

    def summary(self) -> list[dict]:
        """Layers grouped by what decides the kernel: part, kind, heads×head_dim, dtype."""
        groups: dict[tuple, dict] = {}
        for l in self.layers:
            key = (l.name.split(".")[0], l.attention, l.heads, l.head_dim, l.dtype)
            g = groups.setdefault(key, {"part": key[0], "kind": l.attention, "heads": l.heads, "head_dim": l.head_dim,
                                        "dtype": l.dtype, "layers": 0, "calls": Counter(), "seqs": set(),
                                        "refused": {}, "kernels": {}})
            g["layers"] += 1
            g["calls"].update(l.served())
            g["seqs"] |= set(l.seqs)
            g["refused"].update(l.refused)
            g["kernels"].update(l.kernels)
        return [{**g, "calls": dict(g["calls"]), "seqs": sorted(g["seqs"])} for g in groups.values()]

    def to_json(self) -> dict:
        return {"requested": self.requested, "strict": self.strict, "chain": [b.name for b in self.chain],
                "served": dict(self.served()), "groups": self.summary(), "fallbacks": self.fallbacks(),
                "layers": [l.to_json() for l in self.layers]}


class CapturingRouter(Router):
    """A router that keeps the inputs of each layer's first call (`sdcli compare` replays them through every
    backend; auto's tuner judges kernels on them)."""

    samples: int | None = None  # keep only that many batch items (None: all)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured: dict[str, tuple] = {}  # layer name -> (q, k, v, mask)

    def attend(self, layer, q, k, v, mask=None):
        if layer.name not in self.captured:
            keep = slice(0, self.samples)
            self.captured[layer.name] = tuple(None if t is None else t[keep].detach().clone() for t in (q, k, v, mask))
        return super().attend(layer, q, k, v, mask)


def sdpa_kernel_choice(q, k, v, mask) -> str:
    """Which kernel plain SDPA picks for these tensors (torch's own dispatcher, asked directly)."""
    try:
        choice = torch._fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return SDPBackend(choice).name.lower()
    except Exception:
        return "unknown"


def eager_call(backend: Backend, q, k, v, mask) -> Callable:
    """The cheapest eager call that runs `backend`'s kernel on tensors like these.

    diffusers' single-kernel SDPA backends (`sdpa-flash`, ...) wrap every call in
    torch.nn.attention.sdpa_kernel, which costs more host time than the rest of the call (docs/benchmarks.md).
    Where plain SDPA picks that kernel anyway, the native call runs it without any switch; otherwise only the
    kernels SDPA would pick first are switched off around the native call. torch's own chooser
    (torch._fused_sdp_choice) says which those are and confirms the kernel, once per route."""
    kernel = SDPA_KERNELS.get(backend.diffusers_name)
    if kernel is None:
        return backend.call
    native = backends.get("sdpa").call
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    switches = []  # torch._C._set_sdp_use_<kernel> of each kernel that SDPA would pick before this one
    try:
        while (choice := torch._fused_sdp_choice(qt, kt, vt, mask)) != kernel:
            if choice not in SDPA_SWITCHES:
                return backend.call
            switches.append(getattr(torch._C, SDPA_SWITCHES[choice]))
            switches[-1](False)
    except Exception:  # no kernel left that takes these tensors, or no chooser for their device (meta)
        return backend.call
    finally:
        for switch in switches:
            switch(True)
    if not switches:
        return native

    def switched(q, k, v, attn_mask=None):
        for switch in switches:
            switch(False)
        try:
            return native(q, k, v, attn_mask=attn_mask)
        finally:
            for switch in switches:
                switch(True)

    return switched


# diffusers' single-kernel SDPA backends -> torch's number for that kernel; that number -> the kernel's switch
SDPA_KERNELS = {name: int(getattr(SDPBackend, kernel)) for name, kernel in (
    ("_native_flash", "FLASH_ATTENTION"), ("_native_efficient", "EFFICIENT_ATTENTION"),
    ("_native_cudnn", "CUDNN_ATTENTION"), ("_native_math", "MATH"))}
SDPA_SWITCHES = {int(getattr(SDPBackend, kernel)): f"_set_sdp_use_{switch}" for kernel, switch in (
    ("FLASH_ATTENTION", "flash"), ("EFFICIENT_ATTENTION", "mem_efficient"), ("CUDNN_ATTENTION", "cudnn"),
    ("MATH", "math"), ("OVERRIDEABLE", "overrideable"))}


class RoutedAttnProcessor:
    """diffusers' AttnProcessor2_0, step for step, with the attention call routed and counted."""

    def __init__(self, router: Router, layer: Layer, stock):
        self.router = router
        self.layer = layer
        self.stock = stock  # the processor it replaced, put back by unroute()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        fused = self.layer.fused
        if fused and encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if fused:
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                key = attn.to_k(encoder_hidden_states)
                value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # (batch, seq, heads, head_dim): the dispatcher's layout, and a view of the projections (no copy)
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # no scale: AttnProcessor2_0 ignores attn.scale (and scale_qk=False) and always uses 1/sqrt(head_dim)
        hidden_states = self.router.attend(self.layer, query, key, value, attention_mask)

        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class RoutedJointAttnProcessor:
    """SD 3's JointAttnProcessor2_0 (and its fused twin), step for step, with the attention call routed and
    counted. Image tokens and text tokens attend as one sequence: the layer's shape is their sum. Without
    text (SD 3.5 Medium's second attention) it is self-attention over the image tokens."""

    def __init__(self, router: Router, layer: Layer, stock):
        self.router = router
        self.layer = layer
        self.stock = stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch

        batch_size, image_tokens = hidden_states.shape[:2]
        fused = getattr(attn, "fused_projections", False)
        if fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            if fused:
                text = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                        attn.add_v_proj(encoder_hidden_states))
            text_query, text_key, text_value = (t.view(batch_size, -1, attn.heads, head_dim) for t in text)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)  # image tokens first, then text
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

        hidden_states = self.router.attend(self.layer, query, key, value)

        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


class Route:
    """Set as `_attention_backend` on a processor that calls diffusers' dispatcher itself (Flux's): the
    processor runs unchanged, and its module's `dispatch_attention_fn` hands the call to the router."""

    def __init__(self, router: Router, layer: Layer, stock):
        self.router = router
        self.layer = layer
        self.stock = stock


def divert_dispatcher(module) -> None:
    """Let `module`'s dispatch_attention_fn (the name its processors call) serve calls that carry a Route.
    Any other call goes on to diffusers' function unchanged, so an unrouted model is untouched."""
    dispatch = module.dispatch_attention_fn
    if hasattr(dispatch, "diffusers_dispatch"):
        return

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              *args, backend=None, **kwargs):
        if not isinstance(backend, Route):
            return dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, *args, backend=backend,
                            **kwargs)
        if dropout_p or is_causal or scale is not None or args or any(kwargs.values()):
            raise RoutingError(f"{backend.layer.name} asks the dispatcher for more than attention "
                               "(dropout, causal mask, its own scale or extra arguments), which sdcli does not route")
        return backend.router.attend(backend.layer, query, key, value, attn_mask)

    dispatch_attention_fn.diffusers_dispatch = dispatch
    module.dispatch_attention_fn = dispatch_attention_fn


def stock_processor(module):
    """The processor diffusers gave `module`: the one sdcli replaced, if it routed the module."""
    processor = module.processor
    if isinstance(processor, (RoutedAttnProcessor, RoutedJointAttnProcessor)):
        return processor.stock
    route = getattr(processor, "_attention_backend", None)
    return route.stock if isinstance(route, Route) else processor


def router_of(module) -> Router | None:
    """The router that serves `module`'s attention, or None where sdcli has not routed it."""
    processor = module.processor
    route = getattr(processor, "_attention_backend", None)
    return route.router if isinstance(route, Route) else getattr(processor, "router", None)


JOINT_PROCESSORS = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0")  # SD 3's: F.sdpa inside
DISPATCHING_PROCESSORS = ("FluxAttnProcessor",)  # call diffusers' dispatcher themselves


def route(pipe, router: Router) -> Router:
    """Route every attention module of the parts its family routes (the denoiser and the VAE), each by the way its
    stock processor computes attention."""
    import copy
    import sys

    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    family = families.of_pipeline(pipe)
    for part in family.routed:
        model = getattr(pipe, part, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if not isinstance(module, (Attention, AttentionModuleMixin)):
                continue
            stock = stock_processor(module)
            kind, where = type(stock).__name__, f"{part}.{name}"
            if kind not in family.processors:
                raise RoutingError(f"{where} uses {kind}, which sdcli does not route; only diffusers' standard "
                                   "attention processors can be replaced")
            if kind == "AttnProcessor" and abs(module.scale - (module.inner_dim // module.heads) ** -0.5) > 1e-12:
                raise RoutingError(f"{where} uses AttnProcessor with scale {module.scale:g} (scale_qk=False); "
                                   "sdcli's processor follows AttnProcessor2_0, which always scales by 1/sqrt(head "
                                   "dim), so routing it would change its results")
            if kind in JOINT_PROCESSORS:  # SD 3.5 Medium's second attention has no text: self-attention
                attention = "self" if module.added_kv_proj_dim is None else "joint"
                module.set_processor(RoutedJointAttnProcessor(router, router.plan(where, module, attention), stock))
            elif kind in DISPATCHING_PROCESSORS:  # Flux: double blocks join text and image, single blocks get
                divert_dispatcher(sys.modules[type(stock).__module__])  # them joined
                processor = copy.copy(stock)  # a processor of its own, even if diffusers shared one
                processor._attention_backend = Route(router, router.plan(where, module, "joint"), stock)
                module.set_processor(processor)
            else:
                attention = "cross" if module.is_cross_attention else "self"
                module.set_processor(RoutedAttnProcessor(router, router.plan(where, module, attention), stock))
    return router


def unroute(pipe) -> None:
    """Give every module sdcli routed the processor it had before."""
    for part in families.of_pipeline(pipe).routed:
        model = getattr(pipe, part, None)
        for module in model.modules() if model is not None else []:
            if hasattr(module, "processor") and hasattr(module, "set_processor"):
                module.set_processor(stock_processor(module))


def processors(pipe) -> dict:
    """The attention processors of every routed part, to put back later with restore()."""
    models = {part: getattr(pipe, part, None) for part in families.of_pipeline(pipe).routed}
    return {part: model.attn_processors for part, model in models.items() if model is not None}


def restore(pipe, saved: dict) -> None:
    for part, procs in saved.items():
        getattr(pipe, part).set_attn_processor(procs)


def seen_shapes(router: Router) -> list[Shape]:
    """The distinct attention shapes a run met (batch included), biggest first: the model's real shapes."""
    shapes = {s for layer in router.layers for s in layer.shapes}
    return sorted(shapes, key=lambda s: (-(s.batch or 1) * s.heads * s.q_len * s.kv_len * s.head_dim, str(s)))
