#!/usr/bin/env bash
# Prepare, on a machine with package access, the wheels that benchmarks/gpu_check.sh installs on a GPU machine with
# no network. That machine (Python 3.12, torch 2.11 + CUDA, triton 3.6, transformers 5.17, accelerate 1.15, peft,
# huggingface_hub 1.3x, tokenizers, safetensors, pyarrow, numpy, scipy, scikit-learn, matplotlib, pytest) lacks what
# hfx needs beyond it: the transformers/peft/datasets/trl/kernels releases hfx is tested with, and their small
# pure-Python dependencies. The versions are the ones installed in this checkout's venv, so the GPU runs the same
# library code as the CPU tests. No model weights: the GPU tests and benchmarks build random-weight models.
#
#   benchmarks/prepare_gpu_wheels.sh [DEST]      # default DEST: .whl (ignored by git; carried to the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-.venv/bin/python}
LIMIT_MIB=60

# Packages the GPU machine lacks or has in another release than hfx supports, pinned to this venv's versions.
PACKAGES=(transformers peft datasets trl kernels dill multiprocess)
SPECS=()
for package in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")
    SPECS+=("$package==$version")
done

rm -rf "$DEST.partial"
mkdir -p "$DEST.partial"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" -d "$DEST.partial" "${SPECS[@]}"

size_kib=$(du -sk "$DEST.partial" | cut -f1)
if (( size_kib > LIMIT_MIB * 1024 )); then
    echo "error: the wheels take $((size_kib / 1024)) MiB, over the ${LIMIT_MIB} MiB the GPU machine can receive" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "$(ls "$DEST" | wc -l) wheels, $((size_kib / 1024)) MiB in $DEST: ${SPECS[*]}"
