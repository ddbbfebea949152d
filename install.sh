#!/bin/sh
# Install sdcli (editable) into the active Python environment: ./install.sh [test]
# A torch that is already installed (a CUDA build on a GPU machine) is kept, never replaced. Without one,
# torch==2.13.0 comes first: pip would otherwise pull the newest torch with several GB of CUDA packages,
# and on this project's CPU machines that exact version resolves to a local CPU build.
set -eu
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0
python -m pip install -e ".${1:+[$1]}"
