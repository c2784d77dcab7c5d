#!/usr/bin/env bash
# Prepare, on a machine with package access, the wheels that benchmarks/gpu_check.sh installs on a GPU machine with
# no network. That machine (Python 3.12, torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, accelerate 1.15, peft,
# huggingface_hub 1.33, tokenizers 0.23.2, safetensors 0.8, numpy, pyarrow, pandas, scipy, scikit-learn, matplotlib,
# pytest, pyyaml, jinja2, psutil) lacks what hfx needs beyond it: the transformers/peft/datasets/trl/kernels
# releases hfx is tested with, and their small pure-Python dependencies (dill, multiprocess). The versions are the
# ones installed in this checkout's venv, so the GPU runs the same library code as the CPU tests. No model weights:
# the GPU tests and benchmarks build random-weight models.
#
# Left out on purpose: kernels' sigstore and tomlkit (only its signature-verification CLI imports them), transformers'
# typer (only its CLI imports it; the machine's transformers 5.17 needs it too), and the
# machine's own releases of everything else (transformers 5.22 accepts hub 1.33, tokenizers 0.23.2, safetensors 0.8;
# gpu_check.sh's environment step prints any requirement of a carried wheel that the machine does not meet).
#
# Wheels are fetched for Python 3.12 and, where a package has per-version wheels (multiprocess), also for the
# versions around it; gpu_check.sh installs only those that fit the Python it runs. The device tool carries the
# working tree and .whl/ together in 64 MiB at most: the script fails above that.
#
#   benchmarks/prepare_gpu_wheels.sh [DEST]      # default DEST: .whl (ignored by git; carried to the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-.venv/bin/python}
LIMIT_MIB=60        # the wheels
CARRY_LIMIT_MIB=64  # the working tree (tracked and untracked, not ignored files) and the wheels together
PYTHON_VERSIONS=(3.12 3.11 3.13)

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
for python_version in "${PYTHON_VERSIONS[@]}"; do  # the same py3 wheels each time: downloaded once
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$python_version" --implementation cp "${platforms[@]}" -d "$DEST.partial" "${SPECS[@]}"
done

size_kib=$(du -sk "$DEST.partial" | cut -f1)
if ((size_kib > LIMIT_MIB * 1024)); then
    echo "error: the wheels take $((size_kib / 1024)) MiB, over the ${LIMIT_MIB} MiB the GPU machine can receive" >&2
    exit 1
fi
tree_kib=0
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    tree_kib=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
fi
if ((size_kib + tree_kib > CARRY_LIMIT_MIB * 1024)); then
    echo "error: the working tree ($((tree_kib / 1024)) MiB) and the wheels ($((size_kib / 1024)) MiB) are over" \
        "the ${CARRY_LIMIT_MIB} MiB carried to the GPU machine" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "$(ls "$DEST" | wc -l) wheels, $((size_kib / 1024)) MiB in $DEST (working tree $((tree_kib / 1024)) MiB):" \
    "${SPECS[*]}"
