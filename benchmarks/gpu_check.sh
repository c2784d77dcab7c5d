#!/usr/bin/env bash
# The GPU check: on one CUDA GPU (H100/H200) with no network, in under 8 minutes, run the `gpu` tests, then the GPU
# benchmarks, and print one summary table. Random-weight models only (built from configs): no weights travel.
#
#   benchmarks/prepare_gpu_wheels.sh            # once, on a machine with package access: wheels into .whl/
#   benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root (with .whl/ beside)
#
# Logs and the summary go to $OUT when it is set, else outputs/gpu-check/. Each step has its own time limit, so one
# hung step cannot eat the others' time; a failed step is reported in the table and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-outputs/gpu-check}
mkdir -p "$LOGS"
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hfx-site \
        .whl/*.whl || { echo "error: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/hfx-site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

"$PYTHON" - <<'EOF' 2>&1 | tee "$LOGS/environment.txt"
import importlib.metadata as metadata
import torch
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE (the gpu tests will skip)")
for name in ("torch", "triton", "transformers", "peft", "accelerate", "datasets", "trl", "kernels", "huggingface_hub"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} MISSING")
import hfx.models, hfx.cartridges.pipeline, hfx.quanta.pipeline, hfx.lens.pipeline, hfx.peer_mla.training  # noqa
EOF

declare -a STEPS=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, remember the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local status=$?
    tail -n 25 "$LOGS/$name.log"
    STEPS+=("$name|$status|$((SECONDS - start))")
}

# 1. The gpu tests (each system end to end on CUDA against the CPU; kernels against their references).
step gpu-tests 240 "$PYTHON" -m pytest -m gpu -p no:cacheprovider -q -rA tests

# 2. Benchmarks: each prints `RESULT <name> <ratio>` lines.
step decode 120 "$PYTHON" benchmarks/cartridges_decode.py --random-model llama-3.2-1b --contexts 2048 8192 32768 \
    --p 2048 --batch 32 --new-tokens 32 --repeats 2 --device cuda
step peer-kernel 90 "$PYTHON" benchmarks/peer_kernel.py --device cuda
step peer-train-step 90 "$PYTHON" benchmarks/peer_mla_train_step.py --device cuda --peer-kernel triton
step quanta-gradients 60 "$PYTHON" benchmarks/quanta_gradients.py --device cuda --random-model
# CPU reference: the same synthesis on the 2-core CPU of the project's CI machine (README, "GPU check").
step synthesis 90 "$PYTHON" benchmarks/cartridges_synthesis.py --random-model smollm2-135m --conversations 64 \
    --batch 16 --skip-single --device cuda --cpu-reference "${SYNTHESIS_CPU_REFERENCE:-0.30}"

{
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    for entry in "${STEPS[@]}"; do
        IFS='|' read -r name status seconds <<<"$entry"
        case $status in 0) verdict=ok ;; 124|137) verdict="timed out" ;; *) verdict="failed ($status)" ;; esac
        echo "| $name | $verdict | $seconds |"
    done
    echo
    grep -hE "^[0-9]+ (passed|failed)|(passed|failed|skipped|error).* in [0-9.]+s" "$LOGS/gpu-tests.log" | tail -n 1
    echo
    echo "| result | value |"
    echo "|---|---|"
    grep -h "^RESULT " "$LOGS"/*.log | awk '{printf "| %s | %s |\n", $2, $3}'
} | tee "$LOGS/summary.md"
