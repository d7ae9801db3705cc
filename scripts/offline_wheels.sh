#!/usr/bin/env bash
# Wheels for running the GPU benchmark (bench/gpu.sh) on a CUDA host that cannot reach a package
# index but already has PyTorch, transformers and accelerate (a vendor's PyTorch image). Fetches,
# for that host's Python, what such an image lacks, at docker/constraints.txt's versions:
#
#   scripts/offline_wheels.sh [folder] [python version]      # default: .whl 3.12
#   # on the GPU host:
#   python3 -m pip install --no-index --no-deps --target /tmp/site folder/*.whl
#   PYTHONPATH=/tmp/site:$PWD OUT_DIR=out PYTHON=python3 bench/gpu.sh round2
set -euo pipefail
folder=${1:-.whl}
python=${2:-3.12}
cd "$(dirname "$0")/.."
# The benchmark's imports (worker/, settings/, core/) beyond torch, transformers, accelerate, numpy,
# pillow, requests, click and aiohttp, which such images carry; cold-start-bk also imports rq
# and redis; bench.seed_table imports worker.progress, which imports discord.py (REST delivery).
packages=(diffusers pydantic pydantic_core pydantic-settings annotated-types typing-inspection
          python-dotenv importlib_metadata torchao prometheus_client redis rq croniter
          python-dateutil discord.py)
mkdir -p "$folder"
for name in "${packages[@]}"; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" docker/constraints.txt | head -1)
  [ -n "$pin" ] || { echo "error: $name is not pinned in docker/constraints.txt" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$folder" "$pin"
done
ls "$folder"
