"""sdcli's own attention backends: declarations like any plug-in's (plugins.py), loaded first.

Each is one `Backend`: its kernel (a diffusers name, or a function of sdcli.kernels), the package it needs, its
checks (sdcli.backends), whether measured `auto` may use it and its place in auto's documented order (`auto_rank`:
without measuring, `--no-tune` and `--fallback` try them lowest first; quantized ones only with `--quantized`).
Adding a backend is adding a declaration here (and its kernel in kernels.py when sdcli calls it itself).
"""

from dataclasses import replace

from sdcli import kernels
from sdcli.backends import QUANTIZED, Backend, Package, cuda, cuda_because, dtypes, fa4_head_dim, flex_head_dim, fp8, \
    head_dim_at_most, head_dim_in, kv_len_multiple_of, no_mask, older_than, on_cuda, sm_at_least, sm_in, \
    torch_at_least, torch_fa4_bridge, torch_flash_impl, xformers_ops

FLASH_HOW = " --no-build-isolation  (no wheel on PyPI: builds from source, needs the CUDA toolkit)"
FLASH3_HOW = "  (build from flash-attention/hopper; Hopper GPUs only)"
FLASH4_HOW = "  (a pre-release, compiled at first use; with a CUDA 13 torch: 'flash-attn-4[cu13]>=4.0.0b36')"
SAGE2_HOW = "  (2.x builds from source: github.com/thu-ml/SageAttention; PyPI's 1.0.6 serves --backend sage1)"
# Measured on the project's 2-core CPU (docs/notebook.md): compiling takes 0.3-17 s per shape, and the compiled
# kernel was slower than sdpa at every shape tried. Every test that runs "each usable backend" would pay that.
FLEX_ON_CPU = "on the CPU it compiles for seconds per shape and then runs slower than sdpa (measured)"
SAGE1_PADDING = "SageAttention 1.0.6 lets the padding keys into the softmax (relative error 0.29 at 77 keys)"

TRITON = Package("triton", ("triton", "pytorch-triton"), "triton", needed_by="torch.compile")
FLASH_ATTN = Package("flash_attn", ("flash-attn", "flash_attn"), "flash_attn", note=FLASH_HOW)
FLASH_ATTN_3 = Package("flash_attn_3", ("flash-attn-3", "flash_attn_3", "flashattn-hopper"), "flash_attn_interface",
                       note=FLASH3_HOW)
FLASH_ATTN_4 = Package("flash_attn_4", ("flash-attn-4",), "flash_attn.cute", "4.0.0b36", needed_by="sdcli",
                       note=FLASH4_HOW)
XFORMERS = Package("xformers", ("xformers",), "xformers", health=xformers_ops)
SAGEATTENTION = Package("sageattention", ("sageattention",), "sageattention")
half = dtypes("fp16", "bf16")

backends = [
    Backend("sdpa", "PyTorch scaled_dot_product_attention; torch picks the kernel", diffusers_name="native",
            auto_rank=110),
    Backend("sdpa-flash", "PyTorch SDPA, FlashAttention-2 kernel only", diffusers_name="_native_flash", auto_rank=70,
            checks=[on_cuda(sm_at_least(8, 0)), on_cuda(half), on_cuda(head_dim_at_most(256)), no_mask]),
    Backend("sdpa-efficient", "PyTorch SDPA, memory-efficient (xformers-derived) kernel only",
            diffusers_name="_native_efficient", auto_rank=100, checks=[cuda, sm_at_least(5, 0)]),
    Backend("sdpa-cudnn", "PyTorch SDPA, cuDNN attention kernel only", diffusers_name="_native_cudnn", auto_rank=90,
            checks=[cuda, sm_at_least(8, 0), half, head_dim_at_most(128)]),
    Backend("sdpa-math", "PyTorch SDPA, reference math kernel (slow, the most exact)", diffusers_name="_native_math",
            in_auto=False),  # materialises the whole score matrix: the reference, never the fastest
    Backend("flex", "PyTorch flex_attention (slow unless compiled)", diffusers_name="flex",
            in_auto=False),  # eager flex is unfused
    Backend("flex-compiled", "PyTorch flex_attention, compiled once per shape", attention=kernels.flex_compiled,
            package=TRITON,  # asked after the GPU: on the CPU the answer is "needs a GPU", not "install triton"
            checks=[torch_at_least("2.5"), cuda_because(FLEX_ON_CPU, "use sdpa on the CPU"), TRITON.check, flex_head_dim],
            in_auto=False),  # a compile per shape: every auto plan, bench and default generate would pay them all
    Backend("flash-attn", "FlashAttention-2 (flash-attn package)", diffusers_name="flash", package=FLASH_ATTN,
            auto_rank=60, checks=[cuda, sm_at_least(8, 0), half, head_dim_at_most(256), no_mask]),
    Backend("flash-attn-3", "FlashAttention-3 for Hopper (flash_attn_interface)", diffusers_name="_flash_3",
            package=FLASH_ATTN_3, auto_rank=50, checks=[cuda, sm_in((9, 0)), half, head_dim_at_most(256), no_mask]),
    # FlashAttention-4 is a pre-release that compiles at first use: auto takes it where measured the fastest, and
    # the unmeasured order leaves it out (no auto_rank)
    Backend("flash-attn-4", "FlashAttention-4 (flash-attn-4, CuTe DSL)", attention=kernels.flash_attn_4,
            package=FLASH_ATTN_4, checks=[cuda, sm_at_least(8, 0), half, fa4_head_dim, no_mask]),
    Backend("sdpa-fa4", "PyTorch SDPA with torch's FlashAttention-4 implementation swapped in",
            attention=kernels.sdpa_fa4, package=FLASH_ATTN_4,
            checks=[torch_flash_impl("FA4"), torch_fa4_bridge, cuda, fa4_head_dim, no_mask]),
    Backend("xformers", "xFormers memory_efficient_attention", diffusers_name="xformers", package=XFORMERS,
            auto_rank=80, checks=[cuda, sm_at_least(5, 0)]),
    Backend("sage", "SageAttention 2: INT8 QK, fp16/fp8 PV", kind=QUANTIZED, diffusers_name="sage",
            package=replace(SAGEATTENTION, note=SAGE2_HOW), auto_rank=30,
            checks=[cuda, sm_in((8, 0), (8, 6), (8, 9), (9, 0), (12, 0), (12, 1)), half, head_dim_at_most(128), no_mask]),
    Backend("sage-fp8", "SageAttention 2: INT8 QK, FP8 PV (Ada, Blackwell)", kind=QUANTIZED,
            diffusers_name="_sage_qk_int8_pv_fp8_cuda", package=SAGEATTENTION, auto_rank=20,
            checks=[cuda, fp8, sm_in((8, 9), (12, 0), (12, 1), what=" (its SM90 twin is sage-fp8-sm90)"), half,
                    head_dim_at_most(128), no_mask]),
    Backend("sage-fp8-sm90", "SageAttention 2: INT8 QK, FP8 PV, Hopper kernel", kind=QUANTIZED,
            diffusers_name="_sage_qk_int8_pv_fp8_cuda_sm90", package=SAGEATTENTION, auto_rank=10,
            checks=[cuda, fp8, sm_in((9, 0)), half, head_dim_at_most(128), no_mask]),
    Backend("sage1", "SageAttention 1 (Triton): INT8 QK, fp16 PV", kind=QUANTIZED, attention=kernels.sage1,
            package=replace(SAGEATTENTION, min_version="1.0.6", needed_by="sage1"), auto_rank=40,
            checks=[older_than("sageattention", "sageattention", "2", "SageAttention 2 serves --backend sage"), cuda,
                    head_dim_in(64, 96, 128), no_mask, kv_len_multiple_of(64, SAGE1_PADDING)]),
]
