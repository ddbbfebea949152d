#!/usr/bin/env bash
# The GPU evidence in one device call of about 8 minutes (issue 21), and an optional short second call for
# FlashAttention-4:
#   scripts/gpu-evidence.sh main [DIR]   environment facts, smoke calls, compare, bench, CUDA graphs, probe, faults, Flux,
#                                        kernel tests, shapes
#   scripts/gpu-evidence.sh fa4 [DIR]    with FlashAttention-4 installed: its facts, probe, compare, kernel tests
# Steps run in order of value, each under its own cap and the rest of a BUDGET (default 450 s; 200 for fa4): a step
# past its time gets SIGINT, and what it finished stays (compare, bench, generate and doctor --probe keep their
# rows). DIR (default gpu-evidence-PART) gets every result; after each step all of it is packed again into
# $OUT/gpu-evidence-PART.tgz (next to DIR without $OUT), so a call cut short still brings back one archive.
# commands.txt has every command with its exit status (124: cut at its cap; "expected" where a failure is the
# point), its seconds and its cap.
#
# On the project's lent GPU machine (../shared/gpu/README.md), call 1 (timeout_s 540, carry .whl and .whl-fa4a,
# filled by ../shared/gpu/wheels.sh then scripts/carry-split.sh):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=$PWD:/tmp/site || exit; scripts/gpu-evidence.sh main /tmp/ev
# call 2 (carry .whl-fa4b): the README's FlashAttention-4 install line, then scripts/gpu-evidence.sh fa4 /tmp/ev-fa4
#
# A dry run on a CPU with the tiny models (every step, in under 3 minutes on an idle 2-core machine):
#   MODEL=tiny MODEL_FLUX=tiny-flux DTYPE=fp32 DTYPE_DIT=fp32 STEPS=2 FLUX_SIZE=128 BATCH_SIZES=1,2 \
#     scripts/gpu-evidence.sh main /tmp/ev
set -uo pipefail
part=${1:?which part: main or fa4} out=${2:-gpu-evidence-$1}
model=${MODEL:-sd15-arch} model_flux=${MODEL_FLUX:-flux-dev-arch} dtype=${DTYPE:-fp16} dtype_dit=${DTYPE_DIT:-bf16}
steps=${STEPS:-} batch_sizes=${BATCH_SIZES:-1,16} flux_size=${FLUX_SIZE:-512}
prompt="a photo of an astronaut riding a horse on mars"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
archive=${OUT:-$(dirname "$out")}/gpu-evidence-$part.tgz
case $part in main) budget=${BUDGET:-450} ;; fa4) budget=${BUDGET:-200} ;; *) echo "part: main or fa4, not $part" >&2; exit 2 ;; esac
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1

pack() {  # everything so far, one archive, replaced whole
  tar -czf "$archive.tmp" -C "$out" . 2>/dev/null && mv -f "$archive.tmp" "$archive"
}

# step NAME CAP [expect=N] COMMAND...: under CAP seconds or the budget's rest, whichever is less; skipped when
# fewer than 15 s are left. Its stdout goes to NAME's file (given as a redirect by the caller), stderr to NAME.log.
step() {
  local name=$1 cap=$2 expect=0; shift 2
  [[ $1 == expect=* ]] && { expect=${1#expect=}; shift; }
  local left=$((budget - SECONDS)) begin=$SECONDS code
  ((left < cap)) && cap=$left
  if ((cap < 15)); then echo "[$part] $name: skipped, out of time: $*" >> "$out/commands.txt"; pack; return; fi
  timeout --signal=INT --kill-after=15 "$cap" "$@" 2>> "$out/$name.log"; code=$?
  # a step killed while inductor wrote a kernel leaves an empty .so that fails every later compile of that graph
  ((code == 124 || code == 137)) && find "${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/torchinductor_$(id -un)}" \
    -name '*.so' -size 0 -delete 2>/dev/null
  local verdict=$([[ $code == "$expect" ]] && echo ok || echo "NOT $expect")
  echo "[$part] $name: exit $code ($verdict), $((SECONDS - begin)) s of $cap: $*" >> "$out/commands.txt"
  pack
}

# The planted faults as a kernel author ships a plug-in (an entry point in a dist-info on PYTHONPATH)
planted() {
  local site=$out/planted-site
  mkdir -p "$site/planted_faults-1.0.dist-info"
  cp "$here/../tests/planted_faults.py" "$site/"
  printf 'Metadata-Version: 2.1\nName: planted_faults\nVersion: 1.0\n' > "$site/planted_faults-1.0.dist-info/METADATA"
  printf '[sdcli.backends]\nplanted = planted_faults:backends\n' > "$site/planted_faults-1.0.dist-info/entry_points.txt"
  echo "$site"
}
faults=scale-x1.01,scale-x1.02,last-key-dropped,bias-0.4pct,keys-shuffled

{ date -u +%FT%TZ; echo "part $part, budget $budget s, $(uname -n)"; } > "$out/commands.txt"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm \
  --format=csv > "$out/nvidia-smi.csv" 2>&1

case $part in
main)
  # 1. the environment: xFormers' ops need the CUDA 12 runtime on the loader's path (doctor's fix); facts with and
  # without it, which libcudart each process mapped, what imports; then doctor with it, for every later step
  step env-plain 20 python3 "$here/gpu_evidence.py" env > "$out/env-plain.json"
  cudart=$(python3 -c 'import nvidia.cuda_runtime as m; print(m.__path__[0])' 2>/dev/null)/lib
  [[ -d $cudart ]] && export LD_LIBRARY_PATH=$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  step env 20 python3 "$here/gpu_evidence.py" env > "$out/env.json"
  step doctor 30 python3 -m sdcli doctor --json --dtype "$dtype" > "$out/doctor.json"
  # 2. one smoke call per usable backend, each in a process of its own: a sticky CUDA error can't poison the rest
  step smoke 60 python3 "$here/gpu_evidence.py" smoke "$out/doctor.json" "$dtype" "$out/smoke" > /dev/null
  # compared: the survivors but the reference itself and flex-compiled (a compile per shape: the probe has it)
  survivors=$(tr , '\n' < "$out/smoke.txt" 2>/dev/null | grep -vx 'sdpa-math\|flex-compiled' | paste -sd, -)
  # 3. the proof: every backend that survived against the most exact one, at kernel level, after a step, in pixels
  step compare-sd15 75 expect=0 python3 -m sdcli compare --seed 42 -m "$model" --dtype "$dtype" --steps "${steps:-10}" \
    ${survivors:+--backends "$survivors"} -o "$out/compare-sd15" --json > "$out/compare-sd15.json"
  # 4. the throughput experiment: stock diffusers, auto, and the three fastest exact backends of that compare
  fastest=$(python3 "$here/gpu_evidence.py" fastest "$out/compare-sd15.json" 3 2>/dev/null)
  step bench-sd15 100 python3 -m sdcli bench -m "$model" --dtype "$dtype" --steps "${steps:-50}" --batch-sizes "$batch_sizes" \
    --repeats 2 --no-find-max --no-micro ${fastest:+--backends "$fastest"} -o "$out/bench-sd15" --json \
    > "$out/bench-sd15.json"
  # 5. CUDA graphs with routing on: inductor raises instead of skipping them (on a CPU: default mode, and it says so)
  step generate-cudagraphs 100 env TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 python3 -m sdcli generate "$prompt" \
    -m "$model" --dtype "$dtype" --steps "${steps:-20}" --num-images 3 --compile --compile-mode reduce-overhead \
    --seed 42 -o "$out/generate-cudagraphs" --json > "$out/generate-cudagraphs.json"
  # 6. every usable kernel alone at SD 1.x's shapes: error against exact attention, ms, TFLOP/s
  step probe-sd1 60 python3 -m sdcli doctor --probe --family sd1 --dtype "$dtype" --json > "$out/doctor-probe-sd1.json"
  # 7. the planted faults, installed as a plug-in: each must fail compare's bound in bf16 (exit 1)
  step compare-planted 45 expect=1 env PYTHONPATH="$(planted):${PYTHONPATH:-}" python3 -m sdcli compare --seed 42 \
    -m "$model" --dtype bf16 --steps "${steps:-5}" --backends "sdpa,$faults" -o "$out/compare-planted" --json \
    > "$out/compare-planted.json"
  # 8. Flux.1's architecture, where joint attention over image and text tokens is most of the work
  step compare-flux 70 python3 -m sdcli compare --seed 42 -m "$model_flux" --dtype "$dtype_dit" --steps "${steps:-4}" \
    --width "$flux_size" --height "$flux_size" ${survivors:+--backends "$survivors"} -o "$out/compare-flux" --json \
    > "$out/compare-flux.json"
  # 9. the kernels' GPU tests (on a CPU they skip)
  step gpu-tests 45 python3 -m pytest -q -m gpu -p no:cacheprovider "$here/../tests/test_kernels.py" \
    "$here/../tests/test_bound.py" > "$out/gpu-tests.txt"
  # 10. trained attention (the built-in shapes model, 64²): the survivors on a real picture, whose grid shows a
  # difference where a random-weight model's noise hides it
  step compare-shapes 30 python3 -m sdcli compare --seed 42 -m shapes --prompt "a red circle on a blue background" \
    --dtype "$dtype" --steps "${steps:-15}" ${survivors:+--backends "$survivors"} -o "$out/compare-shapes" --json \
    > "$out/compare-shapes.json"
  ;;
fa4)
  step env 30 python3 "$here/gpu_evidence.py" env > "$out/env.json"
  step probe-sd1 90 python3 -m sdcli doctor --probe --family sd1 --dtype "$dtype" --json > "$out/doctor-probe-sd1-fa4.json"
  # sdpa-fa4 fails where torch's FA4 bridge can't take flash-attn-4's results (torch <= 2.13): exit 1 expected
  step compare-sd15 60 expect=1 python3 -m sdcli compare --seed 42 -m "$model" --dtype "$dtype" --steps "${steps:-10}" \
    --backends sdpa,flash-attn-4,sdpa-fa4 -o "$out/compare-sd15-fa4" --json > "$out/compare-sd15-fa4.json"
  step gpu-tests 40 python3 -m pytest -q -m gpu -p no:cacheprovider "$here/../tests/test_kernels.py" \
    > "$out/gpu-tests-fa4.txt"
  ;;
esac
echo "[$part] done in $SECONDS s" >> "$out/commands.txt"
pack
exit 0
