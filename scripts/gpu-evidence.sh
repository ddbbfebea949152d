#!/usr/bin/env bash
# The GPU evidence (issue 14), in device calls of under 10 minutes each, into folder $2 (default: gpu-evidence):
#   scripts/gpu-evidence.sh 1 OUT   first call: everything that needs no FlashAttention-4
#   scripts/gpu-evidence.sh 2 OUT   second call, FlashAttention-4 installed: it, then the throughput experiment
# Steps run in order of value, each under its own cap and the time left of BUDGET seconds (default 500), so a
# call ends in time and a cut-short one keeps what finished: a step past its time gets SIGINT (generate and
# bench keep what they made). commands.txt gets every command with its exit status (124: cut at its time) and
# seconds.
# On the project's lent GPU machine, install the wheels first (../shared/gpu/README.md), e.g. for part 1:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=$PWD:/tmp/site && scripts/gpu-evidence.sh 1 /tmp/ev && tar -czf $OUT/ev1.tgz -C /tmp/ev .
# (the lent machine sends back at most 8 files, hence one archive per call).
# The models and sizes can be made small for a dry run on a CPU:
#   MODEL=tiny MODEL_XL=tiny-sdxl MODEL_SD3=tiny-sd3 MODEL_FLUX=tiny-flux DTYPE=fp32 DTYPE_DIT=fp32 STEPS=2 \
#     BATCH_SIZES=1,2 MAX_BATCH=4 scripts/gpu-evidence.sh 1 /tmp/ev   (and 2)
set -uo pipefail
part=${1:?which part: 1 or 2} out=${2:-gpu-evidence}
model=${MODEL:-sd15-arch} model_xl=${MODEL_XL:-sdxl-arch} dtype=${DTYPE:-fp16}
model_sd3=${MODEL_SD3:-sd35-medium-arch} model_flux=${MODEL_FLUX:-flux-dev-arch} dtype_dit=${DTYPE_DIT:-bf16}
steps=${STEPS:-} batch_sizes=${BATCH_SIZES:-1,2,4,8,16,32,64} max_batch=${MAX_BATCH:-256}
budget=${BUDGET:-500}
prompt="a photo of an astronaut riding a horse on mars"
mkdir -p "$out"

# run CAP COMMAND...: under CAP seconds or the budget's rest, whichever is less; skipped when under 20 s are left
run() {
  local cap=$1; shift
  local left=$((budget - SECONDS)) begin=$SECONDS code
  ((left < cap)) && cap=$left
  if ((cap < 20)); then echo "[part $part: skipped, out of time] $*" >> "$out/commands.txt"; return; fi
  timeout --signal=INT --kill-after=20 "$cap" "$@"; code=$?
  echo "[part $part: exit $code, $((SECONDS - begin)) s of $cap] $*" >> "$out/commands.txt"
}

# The planted faults as a kernel author ships a plug-in (an entry point in a dist-info on PYTHONPATH)
planted() {
  local site=/tmp/sdcli-planted
  mkdir -p "$site/planted_faults-1.0.dist-info"
  cp tests/planted_faults.py "$site/"
  printf 'Metadata-Version: 2.1\nName: planted_faults\nVersion: 1.0\n' > "$site/planted_faults-1.0.dist-info/METADATA"
  printf '[sdcli.backends]\nplanted = planted_faults:backends\n' > "$site/planted_faults-1.0.dist-info/entry_points.txt"
  echo "$site"
}
faults=scale-x1.01,scale-x1.02,last-key-dropped,bias-0.4pct,keys-shuffled

case $part in
1)
  run 20 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv"
  run 150 python3 -m sdcli doctor --json --probe > "$out/doctor-probe.json"
  run 150 python3 -m pytest -q -m gpu tests > "$out/gpu-tests.txt" 2>&1  # among them: CUDA graphs kept
  # the proof: every usable backend against the most exact one, fp16 and bf16; the planted faults must fail
  run 100 python3 -m sdcli compare --seed 42 -m "$model" --dtype "$dtype" --steps "${steps:-20}" \
      -o "$out/compare-sd15" --json > "$out/compare-sd15-$dtype.json"
  run 100 python3 -m sdcli compare --seed 42 -m "$model" --dtype bf16 --steps "${steps:-20}" \
      -o "$out/compare-sd15" --json > "$out/compare-sd15-bf16.json"
  run 60 env PYTHONPATH="$(planted):${PYTHONPATH:-}" python3 -m sdcli compare --seed 42 -m "$model" --dtype bf16 \
      --steps "${steps:-5}" --backends "sdpa,$faults" -o "$out/compare-planted" --json > "$out/compare-planted.json"
  run 100 python3 -m sdcli compare --seed 42 -m "$model_xl" --dtype "$dtype" --steps "${steps:-10}" \
      -o "$out/compare-sdxl" --json > "$out/compare-sdxl.json"
  # xformers on a CUDA 13 torch: does doctor's fix (the CUDA 12 runtime on the loader's path) make its ops load?
  cudart=$(python3 -c 'import nvidia.cuda_runtime as m; print(m.__path__[0])' 2>/dev/null)/lib
  run 30 env LD_LIBRARY_PATH="$cudart:${LD_LIBRARY_PATH:-}" python3 -m sdcli doctor --json > "$out/doctor-cudart12.json"
  device=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
  run 60 python3 scripts/attention_overhead.py --device "$device" --json > "$out/attention-overhead.json"
  # CUDA graphs with routing on: inductor raises instead of skipping them (TORCHINDUCTOR_CUDAGRAPH_OR_ERROR; on a
  # CPU there are none: default mode, and it says so)
  run 120 env TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 TORCH_LOGS=cudagraphs python3 -m sdcli generate "$prompt" \
      -m "$model" --dtype "$dtype" --steps "${steps:-30}" --num-images 3 --compile --compile-mode reduce-overhead \
      --seed 42 -o "$out/generate-cudagraphs" --json > "$out/generate-cudagraphs.json" \
      2> "$out/generate-cudagraphs.log"
  # the transformer families, where attention is most of the work (bf16: their published dtype)
  run 90 python3 -m sdcli compare --seed 42 -m "$model_sd3" --dtype "$dtype_dit" --steps "${steps:-10}" \
      -o "$out/compare-sd35m" --json > "$out/compare-sd35m.json"
  run 90 python3 -m sdcli compare --seed 42 -m "$model_flux" --dtype "$dtype_dit" --steps "${steps:-10}" \
      -o "$out/compare-flux" --json > "$out/compare-flux.json"
  ;;
2)
  run 120 python3 -m sdcli doctor --json --probe > "$out/doctor-probe-fa4.json"
  run 90 python3 -m pytest -q -m gpu tests/test_kernels.py > "$out/gpu-tests-kernels.txt" 2>&1
  # the throughput experiment: stock diffusers, each backend, auto, by batch size (cut short, it keeps its rows)
  run 300 python3 -m sdcli bench -m "$model" --dtype "$dtype" --steps "${steps:-50}" --batch-sizes "$batch_sizes" \
      --repeats 2 --no-find-max -o "$out/bench-sd15" --json > "$out/bench-sd15.json"
  # auto's plan on its own: where it differs from the best single backend (the bench's rows)
  run 60 python3 -m sdcli generate "$prompt" -m "$model" --dtype "$dtype" --steps "${steps:-30}" --seed 42 \
      -o "$out/generate-auto" --json > "$out/generate-auto.json"
  # the speed options: stock and auto, both compiled with CUDA graphs, the VAE too
  run 150 python3 -m sdcli bench -m "$model" --dtype "$dtype" --steps "${steps:-50}" --batch-sizes 1,16 --repeats 2 \
      --backends sdpa --compile --compile-mode reduce-overhead --compile-vae --channels-last --fuse-qkv \
      --cudnn-benchmark --no-find-max --no-micro -o "$out/bench-sd15-compiled" --json > "$out/bench-sd15-compiled.json"
  # the largest batch that fits (a 1-step render per try)
  run 90 python3 -m sdcli bench -m "$model" --dtype "$dtype" --steps 1 --batch-sizes 1 --repeats 1 --backends sdpa \
      --max-batch "$max_batch" --no-micro -o "$out/bench-sd15-max" --json > "$out/bench-sd15-max.json"
  # SDXL latency at batch 1: stock against auto
  run 120 python3 -m sdcli bench -m "$model_xl" --dtype "$dtype" --steps "${steps:-30}" --batch-sizes 1 --repeats 2 \
      --backends sdpa --no-find-max --no-micro -o "$out/bench-sdxl" --json > "$out/bench-sdxl.json"
  ;;
*) echo "part must be 1 or 2, not $part" >&2; exit 2 ;;
esac
echo "part $part: $SECONDS s" >> "$out/commands.txt"
exit 0
