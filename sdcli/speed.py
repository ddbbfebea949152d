"""Speed options, and how sdcli keeps its evidence exact under them.

- diffusers' own: fused q/k/v projections and the channels-last memory format.
- TF32 for the fp32 parts on CUDA (matmuls and convolutions), as diffusers' docs recommend; `--no-tf32`
  keeps them in full fp32 (kernels are judged in full fp32 either way: numerics.full_fp32). cuDNN's
  autotuner (`cudnn.benchmark`) for the VAE's big convolutions, off unless asked: it may pick another
  algorithm on the next run, and so another rounding.
- torch.compile of the denoiser (UNet or transformer) and of the VAE's decode, in any of torch's modes,
  wrapped by `Compiled`.

Under `Compiled`, the first call with each new input shape runs eagerly: the router chooses its routes
there, outside any graph, and counts the calls as usual. Routes never change after that, so a compiled
call makes exactly the calls its shape's eager call made: they are added per forward, outside the
graph, and nothing of sdcli's is mutated inside it (CUDA graphs stay possible).
"""

from __future__ import annotations

import functools
from collections import Counter

from sdcli import families
from sdcli.devices import is_cuda

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# what a mode becomes where there are no CUDA graphs (they need a CUDA GPU)
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def apply(pipe, fuse_qkv: bool = False, channels_last: bool = False) -> None:
    """Options diffusers users know, on every model with attention (denoiser, VAE, ControlNets). Before or after
    routing alike: diffusers' fused processor makes the same attention call, which stays routed."""
    import torch

    from sdcli import lora
    from sdcli.routing import attention_models

    if fuse_qkv:
        lora.fuse(pipe)  # fused projections would drop PEFT's LoRA layers silently
    for model in attention_models(pipe).values():
        if fuse_qkv and hasattr(model, "fuse_qkv_projections"):
            model.fuse_qkv_projections()
        if channels_last:
            model.to(memory_format=torch.channels_last)


def set_precision(device: str, tf32: bool, cudnn_benchmark: bool) -> dict:
    """TF32 and cuDNN's autotuner for this process; both matter on CUDA only. Returns what is in effect."""
    import torch

    cuda = is_cuda(device)
    if cuda:  # the flags diffusers' docs use (torch's newer fp32_precision API must not be mixed with them)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return {"tf32": tf32 and cuda, "cudnn_benchmark": cudnn_benchmark and cuda}


def compile_mode(mode: str, device: str) -> tuple[str, str | None]:
    """The torch.compile mode to use on `device`, and a note when it is not the one asked for."""
    if is_cuda(device) or mode not in WITHOUT_CUDA_GRAPHS:
        return mode, None
    used = WITHOUT_CUDA_GRAPHS[mode]
    return used, f"--compile-mode {mode} uses CUDA graphs, which need a CUDA GPU: compiled in {used} mode instead"


def compile(pipe, family: families.Family, mode: str, denoiser: bool = False, vae: bool = False) -> None:
    """torch.compile the denoiser's forward (the family's UNet or transformer) and/or the VAE's decode, in place."""
    if denoiser:
        model = getattr(pipe, family.denoiser)
        model.forward = Compiled(model, model.forward, mode)
    if vae:
        pipe.vae.decode = Compiled(pipe.vae, pipe.vae.decode, mode)


class Compiled:
    """A module's method under torch.compile, eager at the first call of each input shape, with the attention
    calls of compiled runs counted per forward, outside the graph."""

    def __init__(self, module, method, mode: str):
        import torch
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        from sdcli.routing import router_of

        self.router_of = router_of
        functools.update_wrapper(self, method)  # its name and signature, for whoever inspects `forward`
        self.eager = method
        self.compiled = torch.compile(method, mode=mode)
        # one attention module, whose processor says which router serves the model now
        self.attention_module = next((m for m in module.modules() if isinstance(m, (Attention, AttentionModuleMixin))), None)
        self.router = None
        self.calls: dict[tuple, Counter] = {}  # input shapes -> the calls one forward makes, per layer and backend

    def __call__(self, *args, **kwargs):
        router = self.router_of(self.attention_module) if self.attention_module is not None else None
        if router is not self.router:  # routed anew: new layers, no routes yet
            self.router, self.calls = router, {}
        shapes = input_shapes(args, kwargs)
        calls = self.calls.get(shapes)
        if calls is None:  # a new shape: routes are chosen, and calls counted, eagerly
            before = router.counts() if router else Counter()
            out = self.eager(*args, **kwargs)
            self.calls[shapes] = (router.counts() if router else Counter()) - before
            return out
        if router is None:
            return self.compiled(*args, **kwargs)
        router.counting = False  # even where dynamo falls back to eager, these calls are counted once, below
        try:
            out = self.compiled(*args, **kwargs)
        finally:
            router.counting = True
        router.add(calls)
        return out


def input_shapes(args, kwargs) -> tuple:
    """What decides a forward's attention calls: the shape and dtype of every tensor argument."""
    import torch
    from torch.utils._pytree import tree_leaves

    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x)
                 for x in tree_leaves((args, kwargs)))
