#!/bin/sh
# Install sdcli (editable) into the active Python environment: ./install.sh [test]
# A torch that is already installed (a CUDA build on a GPU machine) is kept, never replaced. Without one,
# torch==2.13.0 comes first: pip would otherwise pull the newest torch. On a machine without an NVIDIA GPU it
# comes from PyTorch's CPU wheel index where that can be reached (pip's default build brings about 15 nvidia-*
# packages, several GB); on this project's CPU machines, which can't reach it, that exact version resolves to a
# local CPU build.
set -eu
cd "$(dirname "$0")"
CPU_INDEX=https://download.pytorch.org/whl/cpu
if python -c "import torch" 2>/dev/null; then
    :
elif command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia ]; then
    python -m pip install torch==2.13.0
elif python -c "import urllib.request as u; u.urlopen('$CPU_INDEX/', timeout=5)" 2>/dev/null; then
    echo "install.sh: no NVIDIA GPU here: torch's CPU build, from $CPU_INDEX"
    python -m pip install torch==2.13.0 --index-url "$CPU_INDEX"
else
    python -m pip install torch==2.13.0
fi
python -m pip install -e ".${1:+[$1]}"
