#!/usr/bin/env bash
# Every GPU measurement the docs need, in one go, into folder $1 (default: gpu-evidence).
# Each command is echoed into $1/commands.txt before it runs, so the numbers keep their command.
# On the project's lent GPU machine, first install the wheels (../shared/gpu/README.md; both calls, so that
# FlashAttention-4 is there too), then e.g.:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
#   scripts/gpu-evidence.sh /tmp/evidence && tar -czf $OUT/evidence.tar.gz -C /tmp/evidence .
# (the lent machine sends back at most 8 files, hence one archive).
# The model and sizes can be made small for a dry run on a CPU:
#   MODEL=tiny MODEL_XL=tiny-sdxl MODEL_SD3=tiny-sd3 MODEL_FLUX=tiny-flux DTYPE=fp32 DTYPE_DIT=fp32 STEPS=2 BATCH_SIZES=1,2 MAX_BATCH=4 scripts/gpu-evidence.sh /tmp/evidence
set -uo pipefail
out=${1:-gpu-evidence}
model=${MODEL:-sd15-arch} model_xl=${MODEL_XL:-sdxl-arch} dtype=${DTYPE:-fp16}
model_sd3=${MODEL_SD3:-sd35-medium-arch} model_flux=${MODEL_FLUX:-flux-dev-arch} dtype_dit=${DTYPE_DIT:-bf16}
steps=${STEPS:-} batch_sizes=${BATCH_SIZES:-1,2,4,8,16,32} max_batch=${MAX_BATCH:-256}
mkdir -p "$out"
sdcli() { python3 -m sdcli "$@"; }
run() { echo "$*" >> "$out/commands.txt"; "$@"; }
run nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv"
run python3 -m pytest -q -m gpu tests > "$out/gpu-tests.txt" 2>&1   # among them: reduce-overhead keeps CUDA graphs
# host time per routed call, every backend that runs through diffusers (docs/benchmarks.md)
device=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
run python3 scripts/attention_overhead.py --device "$device" --json > "$out/attention-overhead.json"
run sdcli doctor --json --probe > "$out/doctor-probe.json"
# xformers on a CUDA 13 torch: does doctor's fix (the CUDA 12 runtime on the loader's path) make its ops load?
cudart=$(python3 -c 'import nvidia.cuda_runtime as m; print(m.__path__[0])' 2>/dev/null)/lib
run env LD_LIBRARY_PATH="$cudart:${LD_LIBRARY_PATH:-}" python3 -m sdcli doctor --json > "$out/doctor-cudart12.json"
# generate with every usable backend (layers it can't take fall back, and the JSON's counts say so)
for b in $(python3 -c "import json; d=json.load(open('$out/doctor-probe.json')); print(' '.join(r['backend'] for r in d['verdicts']['backends'] if r['status'] == 'usable'))"); do
  run sdcli generate "a photo of an astronaut riding a horse on mars" -m "$model" --backend "$b" --fallback \
      --dtype "$dtype" --steps "${steps:-30}" --seed 42 -o "$out/generate-sd15" --json > "$out/generate-sd15-$b.json"
done
# compare: every usable backend, the new ones included (sage1 against its quantized bound)
run sdcli compare --seed 42 -m "$model" --dtype "$dtype" --steps "${steps:-20}" -o "$out/compare-sd15" --json > "$out/compare-sd15.json"
run sdcli compare --seed 42 -m "$model_xl" --dtype "$dtype" --steps "${steps:-10}" -o "$out/compare-sdxl" --json > "$out/compare-sdxl.json"
run sdcli bench -m "$model" --dtype "$dtype" --steps "${steps:-50}" --batch-sizes "$batch_sizes" --max-batch "$max_batch" \
    --compile --channels-last --fuse-qkv -o "$out/bench-sd15" --json > "$out/bench-sd15.json"
# the transformer families, where attention is most of the work (bf16: their published dtype)
run sdcli compare --seed 42 -m "$model_sd3" --dtype "$dtype_dit" --steps "${steps:-10}" -o "$out/compare-sd35m" --json > "$out/compare-sd35m.json"
run sdcli compare --seed 42 -m "$model_flux" --dtype "$dtype_dit" --steps "${steps:-10}" -o "$out/compare-flux" --json > "$out/compare-flux.json"
run sdcli bench -m "$model_flux" --dtype "$dtype_dit" --steps "${steps:-28}" --batch-sizes 1,2,4 --max-batch 16 \
    -o "$out/bench-flux" --json > "$out/bench-flux.json"
# CUDA graphs with routing on: generate with reduce-overhead, where inductor raises instead of skipping them
# (TORCHINDUCTOR_CUDAGRAPH_OR_ERROR; on a CPU there are none: default mode, and it says so)
run env TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 TORCH_LOGS=cudagraphs python3 -m sdcli generate \
    "a photo of an astronaut riding a horse on mars" -m "$model" --dtype "$dtype" --steps "${steps:-30}" \
    --num-images 3 --compile --compile-mode reduce-overhead --seed 42 -o "$out/generate-cudagraphs" --json \
    > "$out/generate-cudagraphs.json" 2> "$out/generate-cudagraphs.log"
# and bench: the same options for stock diffusers and auto, the VAE compiled and autotuned too
run sdcli bench -m "$model" --dtype "$dtype" --steps "${steps:-50}" --batch-sizes "${CUDAGRAPH_BATCH_SIZES:-1,4,16}" \
    --compile --compile-mode reduce-overhead --compile-vae --cudnn-benchmark --no-micro --no-find-max \
    -o "$out/bench-sd15-cudagraphs" --json > "$out/bench-sd15-cudagraphs.json"
exit 0
