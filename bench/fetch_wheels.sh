#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the GPU image lacks for bench/run.py, for its Python 3.12
# on manylinux x86-64. The image (see bench/BENCHMARKS.md) has jax 0.11.2 with CUDA 13, flax,
# optax, orbax-checkpoint, chex, torch 2.11, torchvision, scipy, absl-py, PyYAML, requests,
# filelock, regex, safetensors 0.8.0, huggingface-hub 1.33.0 and pillow; it lacks:
#   ml_collections  diffdyn's configs and launch.py's flags (needs absl-py, PyYAML: there)
#   diffusers       the peer's UNet and DDPM scheduler (its runtime needs are there; it
#                   imports importlib_metadata only on Python < 3.8)
#   pytorch-fid     the peer's Inception (needs numpy, pillow, scipy, torch, torchvision: there)
# clu is not needed: the benchmark's E6 run sets train.tensorboard=False, and diffdyn then
# never imports it (CLU's writers need TensorFlow, which the image lacks too).
#
#   bench/fetch_wheels.sh          # then carry .whl to the GPU machine (git ignores it)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(ml_collections==1.1.0 diffusers==0.42.1 pytorch-fid==0.3.0)
LIMIT_MIB=64

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"

# pip install --no-index takes every wheel in the folder: any other one would travel and
# install too (and two versions of one package stop the install), so none may be there.
expected=(ml_collections-1.1.0-py3-none-any.whl diffusers-0.42.1-py3-none-any.whl
          pytorch_fid-0.3.0-py3-none-any.whl)
for wheel in .whl/*.whl; do
  name=$(basename "$wheel")
  if [[ ! " ${expected[*]} " == *" $name "* ]]; then
    echo "error: .whl/$name is not one of the benchmark's wheels; move it out of .whl/" >&2
    exit 2
  fi
done
size_kib=$(du -sk .whl | cut -f1)
if (( size_kib > LIMIT_MIB * 1024 )); then
  echo "error: .whl/ holds ${size_kib} KiB, over the ${LIMIT_MIB} MiB a device call carries" >&2
  exit 2
fi
echo ".whl/: ${#expected[@]} wheels, ${size_kib} KiB"
ls -l .whl
