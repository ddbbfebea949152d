#!/usr/bin/env bash
# Every GPU measurement the docs need, in one go, into folder $1 (default: gpu-evidence).
# Each command is echoed into $1/commands.txt before it runs, so the numbers keep their command.
# On the project's lent GPU machine, first make the wheels (../shared/gpu/README.md), then e.g.:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
#   scripts/gpu-evidence.sh $OUT
set -uo pipefail
out=${1:-gpu-evidence}
mkdir -p "$out"
sdcli() { python3 -m sdcli "$@"; }
run() { echo "$*" >> "$out/commands.txt"; "$@"; }
run nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv"
run python3 -m pytest -q -m gpu tests > "$out/gpu-tests.txt" 2>&1
run sdcli doctor --json --probe > "$out/doctor-probe.json"
# generate with every usable backend (layers it can't take fall back, and the JSON's counts say so)
for b in $(python3 -c "import json; d=json.load(open('$out/doctor-probe.json')); print(' '.join(r['backend'] for r in d['verdicts']['backends'] if r['status'] == 'usable'))"); do
  run sdcli generate "a photo of an astronaut riding a horse on mars" -m sd15-arch --backend "$b" --fallback \
      --dtype fp16 --steps 30 --seed 42 -o "$out/generate-sd15" --json > "$out/generate-sd15-$b.json"
done
run sdcli compare --seed 42 -m sd15-arch --dtype fp16 --steps 20 -o "$out/compare-sd15" --json > "$out/compare-sd15.json"
run sdcli compare --seed 42 -m sdxl-arch --dtype fp16 --steps 10 -o "$out/compare-sdxl" --json > "$out/compare-sdxl.json"
run sdcli bench -m sd15-arch --dtype fp16 --steps 50 --batch-sizes 1,2,4,8,16,32 --compile --channels-last --fuse-qkv \
    -o "$out/bench-sd15" --json > "$out/bench-sd15.json"
# the transformer families, where attention is most of the work (bf16: their published dtype)
run sdcli compare --seed 42 -m sd35-medium-arch --dtype bf16 --steps 10 -o "$out/compare-sd35m" --json > "$out/compare-sd35m.json"
run sdcli compare --seed 42 -m flux-dev-arch --dtype bf16 --steps 10 -o "$out/compare-flux" --json > "$out/compare-flux.json"
run sdcli bench -m flux-dev-arch --dtype bf16 --steps 28 --batch-sizes 1,2,4 --max-batch 16 \
    -o "$out/bench-flux" --json > "$out/bench-flux.json"
exit 0
