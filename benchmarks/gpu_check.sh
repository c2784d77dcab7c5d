#!/usr/bin/env bash
# The GPU check: on one CUDA GPU (H100/H200) with no network, run the `gpu` tests and the GPU benchmarks, and print
# one summary table. Random-weight models only (built from configs): no weights travel.
#
#   benchmarks/prepare_gpu_wheels.sh            # once, on a machine with package access: wheels into .whl/
#   benchmarks/gpu_check.sh                      # on the GPU machine, from the repository root (with .whl/ beside)
#   GPU_CHECK_PARTS=main-job benchmarks/gpu_check.sh   # the main job's two 3-minute runs (a call of their own)
#
# The parts (GPU_CHECK_PARTS, words separated by spaces; default "tests bench", under 8 minutes):
#   tests     the `gpu` tests (fp32 against the CPU, and bf16)
#   bench     in order of what is still to be shown: synthesis at 16 conversations per chunk and at the device-sized
#             batch (graph captures and compilations after warm-up, and where one batch's time goes: prefills,
#             decode steps, the host's work), cartridge vs ICL decode at the peak batch, quanta gradients in bf16, a
#             PEER-MLA vs dense training step (with a profile of one step of each: kernels, device busy share), the
#             main job's plans under a 3-minute budget for the default mix and half generated (planned, not run),
#             decode at a fixed batch, the PEER kernel, and GRPO steps of the lens's verbaliser
#   main-job  `hfx cartridge run --budget_minutes 3` end to end on a random model of the embedded shape, with the
#             default mix and with half generated conversations: each plan and its wall time against the budget
#             (two 3-minute runs do not fit the 8 minutes beside the rest: a second call, with its own budget);
#             main-job-default and main-job-half name one of the two
#
# The wheels of .whl/ that fit this Python are installed (no deps, no index) into $HFX_SITE (default /tmp/hfx-site),
# which goes first on PYTHONPATH, then src/ and the repository root: the carried transformers/peft/... shadow the
# machine's own releases, and hfx runs from the checkout (it is not installed). The environment step prints what is
# imported from where, and fails when a carried package is not the one imported, when a module the check needs does
# not import, or when a CUDA tensor or a Triton kernel cannot run.
#
# Logs and the summary go to $OUT when it is set, else outputs/gpu-check/. Each step has its own time limit, and all
# of them share one budget (GPU_CHECK_BUDGET seconds, default 465 with tests or bench: under 8 minutes; 540 for the
# main job alone), so one hung step cannot eat the others' time and the summary table is printed before a caller's
# 10-minute limit; a step that no longer fits is reported "not run".
# A failed step is reported in the table and the script goes on. The exit status is 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
LOGS=${OUT:-outputs/gpu-check}
mkdir -p "$LOGS"
PYTHON=${PYTHON:-python3}
HFX_SITE=${HFX_SITE:-/tmp/hfx-site}
PARTS=" ${GPU_CHECK_PARTS:-tests bench} "
part() { [[ $PARTS == *" $1 "* ]]; }
# 465 s (under 8 minutes) for the tests and benchmarks; the main job's two 3-minute runs take a call of their own
if part tests || part bench; then BUDGET=${GPU_CHECK_BUDGET:-465}; else BUDGET=${GPU_CHECK_BUDGET:-540}; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Triton, torch.compile and the HF libraries write caches under $HOME: give them a writable one.
if ! { [ -n "${HOME:-}" ] && [ -d "$HOME" ] && [ -w "$HOME" ]; }; then
    export HOME=/tmp/hfx-home
    mkdir -p "$HOME"
fi
WORK=$(mktemp -d /tmp/hfx-gpu-check.XXXXXX)

declare -a STEPS=()
record() {  # record NAME STATUS SECONDS
    STEPS+=("$1|$2|$3")
}

summary() {
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    local entry name status seconds verdict
    for entry in ${STEPS[@]+"${STEPS[@]}"}; do
        IFS='|' read -r name status seconds <<<"$entry"
        case $status in
            0) verdict=ok ;;
            124) verdict="timed out" ;;
            137) verdict="killed (137: over its time limit, or out of memory)" ;;
            127) verdict="failed (127: command or script not found)" ;;
            143) verdict="interrupted" ;;
            skip) verdict="not run (over the ${BUDGET}s budget)" ;;
            *) verdict="failed ($status)" ;;
        esac
        echo "| $name | $verdict | $seconds |"
    done
    if [ -f "$LOGS/gpu-tests.log" ]; then
        echo
        grep -hE "(passed|failed|skipped|errors?|deselected|no tests ran).* in [0-9.]+s" "$LOGS/gpu-tests.log" | tail -n 1
    fi
    echo
    echo "| result | value |"
    echo "|---|---|"
    grep -sh "^RESULT " "$LOGS"/*.log | awk '{printf "| %s | %s |\n", $2, $3}'
    return 0
}
CURRENT=
interrupted() {  # a TERM or INT from outside (a caller's time limit): the table still comes out, the step running last
    [ -n "$CURRENT" ] && record "$CURRENT" 143 $((SECONDS - ${CURRENT_START:-0}))
    summary | tee "$LOGS/summary.md"
    rm -rf "$WORK"
    exit 143
}
trap interrupted TERM INT

# 0. The carried wheels that fit this Python and platform (prepare_gpu_wheels.sh may bring one per Python version),
#    no dependencies, no index (the machine has no network), pip's configuration ignored (a constraints file there
#    could refuse the newer transformers). Without pip, the wheels are unpacked directly.
start=$SECONDS
install_status=0
wheels=()
if compgen -G ".whl/*.whl" >/dev/null; then
    {
        echo "== install .whl/ into $HFX_SITE"
        mapfile -t wheels < <("$PYTHON" - .whl/*.whl <<'EOF'
import sys
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

rank = {tag: i for i, tag in enumerate(sys_tags())}  # most specific first: py312 before py311 on 3.12
best = {}
for path in sys.argv[1:]:
    name, _, _, tags = parse_wheel_filename(path.rsplit("/", 1)[-1])
    score = min((rank[tag] for tag in tags if tag in rank), default=None)
    if score is None:
        print("skipped (not for this Python or platform):", path, file=sys.stderr)
    elif name in best and best[name][0] <= score:
        print("skipped (a closer fit is there):", path, file=sys.stderr)
    else:
        if name in best:
            print("skipped (a closer fit is there):", best[name][1], file=sys.stderr)
        best[name] = (score, path)
for _, path in best.values():
    print(path)
EOF
        )
        if ! ((${#wheels[@]})); then
            echo "no wheel of .whl/ fits $PYTHON"
            false
        else
            case $HFX_SITE in /tmp/* | "$HOME"/*) rm -rf "$HFX_SITE" ;; esac
            mkdir -p "$HFX_SITE"
            if "$PYTHON" -m pip --version >/dev/null 2>&1; then
                "$PYTHON" -m pip --isolated install -q --disable-pip-version-check --no-index --no-deps \
                    --no-compile --no-cache-dir --upgrade --target "$HFX_SITE" "${wheels[@]}"
            else
                echo "no pip for $PYTHON: unpacking the wheels"
                "$PYTHON" - "$HFX_SITE" "${wheels[@]}" <<'EOF'
import re, sys, zipfile
target, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            data = re.match(r"[^/]+\.data/(purelib|platlib)/(.+)", name)
            if data:
                name = data.group(2)
            elif re.match(r"[^/]+\.data/", name):
                continue  # scripts, headers: not importable
            if not name.endswith("/"):
                member.filename = name
                archive.extract(member, target)
    print("unpacked", wheel)
EOF
            fi
        fi
    } >"$LOGS/install.log" 2>&1
    install_status=$?
    export PYTHONPATH=$HFX_SITE:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "== no .whl/*.whl: the machine's own packages only" >"$LOGS/install.log"
    export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
cat "$LOGS/install.log"
record install "$install_status" $((SECONDS - start))

# 1. What runs: the GPU, the toolchain Triton compiles with, the versions and where they come from. Each carried
#    wheel must be what is imported, the modules of the tests and benchmarks must import, and on CUDA a tensor
#    operation and a Triton kernel must run. (A file, not stdin: Triton reads a kernel's source from its file.)
cat >"$WORK/hfx_environment.py" <<'EOF'
import importlib, importlib.metadata as metadata, os, platform, shutil, sys, sysconfig

site, wheels = sys.argv[1], sys.argv[2:]
failures = []
print("python", sys.version.split()[0], platform.machine(), "| PYTHONPATH", os.environ.get("PYTHONPATH"))
include = sysconfig.get_paths()["include"]
print("C compiler (Triton builds its launcher with it):", os.environ.get("CC") or shutil.which("gcc")
      or shutil.which("clang") or "NONE", "| Python.h:", os.path.exists(os.path.join(include, "Python.h")))
import torch

cuda = torch.cuda.is_available()
print("gpu:", torch.cuda.get_device_name() if cuda else "NONE (the gpu tests will skip, the benchmarks fail)")
print("torch cuda", torch.version.cuda, "| devices", torch.cuda.device_count())


def where(name):
    try:
        return os.path.dirname(importlib.import_module(name).__file__)
    except Exception as error:  # noqa: BLE001
        return f"IMPORT FAILED: {type(error).__name__}: {error}"


for name, module in (
    ("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
    ("accelerate", "accelerate"), ("datasets", "datasets"), ("trl", "trl"), ("kernels", "kernels"),
    ("huggingface_hub", "huggingface_hub"), ("tokenizers", "tokenizers"), ("safetensors", "safetensors"),
    ("numpy", "numpy"), ("pyarrow", "pyarrow"), ("pandas", "pandas"), ("fsspec", "fsspec"), ("dill", "dill"),
    ("multiprocess", "multiprocess"), ("regex", "regex"), ("typer", "typer"), ("psutil", "psutil"),
    ("scikit-learn", "sklearn"), ("PyYAML", "yaml"), ("jinja2", "jinja2"), ("matplotlib", "matplotlib"),
):
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(f"{name:16s} MISSING")
        continue
    print(f"{name:16s} {version:22s} {where(module)}")

# Each carried wheel shadows the machine's release of the same package: its version is what metadata and import see.
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

for wheel in wheels:
    distribution, version = parse_wheel_filename(os.path.basename(wheel))[:2]
    found = metadata.distribution(distribution)
    location = os.path.realpath(found.locate_file(""))
    if found.version != str(version) or location != os.path.realpath(site):
        failures.append(f"{distribution}: carried {version}, but {found.version} from {location} comes first")
    # its requirements against what this machine has: warnings (the imports below are the real test)
    for requirement in found.requires or []:
        req = Requirement(requirement)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(canonicalize_name(req.name))
        except metadata.PackageNotFoundError:
            print(f"warning: {distribution} {version} requires {req}, which is not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            print(f"warning: {distribution} {version} requires {req}, this machine has {have}")

modules = (
    "transformers", "peft", "datasets", "trl", "kernels", "triton.language",
    "hfx.models", "hfx.tokenization", "hfx.embedded", "hfx.losses", "hfx.artifacts", "hfx.generation",
    "hfx.cartridges.pipeline", "hfx.cartridges.synthesis", "hfx.cartridges.training", "hfx.cartridges.evaluation",
    "hfx.cartridges.prefix", "hfx.quanta.pipeline", "hfx.quanta.gradients", "hfx.lens.pipeline", "hfx.lens.training",
    "hfx.lens.nla", "hfx.lens.nla_pipeline",
    "hfx.peer_mla.training", "hfx.peer_mla.modeling_peer_mla", "hfx.peer_mla.configuration_peer_mla",
    "benchmarks._random_models", "benchmarks._measure",
)
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as error:  # noqa: BLE001
        failures.append(f"import {name}: {type(error).__name__}: {error}")
for module, symbols in (
    ("trl", "TrlParser"),
    ("peft", "CartridgeConfig get_peft_model compose_cartridge_adapters"),
    ("kernels", "LocalLayerRepository Mode kernelize use_kernel_mapping get_kernel get_local_kernel"),
    ("transformers", "LlamaConfig LlamaForCausalLM AutoModelForCausalLM Trainer"),
):
    for symbol in symbols.split():
        try:
            getattr(importlib.import_module(module), symbol)
        except Exception as error:  # noqa: BLE001
            failures.append(f"from {module} import {symbol}: {type(error).__name__}: {error}")
if wheels and "transformers" in sys.modules:
    transformers = sys.modules["transformers"]
    print("transformers imported from", os.path.dirname(transformers.__file__))

if cuda:
    try:
        x = torch.randn(256, 256, device="cuda")
        torch.testing.assert_close((x @ x).cpu(), x.cpu() @ x.cpu(), rtol=1e-2, atol=1e-2)
        print("cuda matmul: ok")
    except Exception as error:  # noqa: BLE001
        failures.append(f"cuda matmul: {type(error).__name__}: {error}")
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offsets < n
            tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask),
                     mask=mask)

        a, b = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
        out = torch.empty_like(a)
        _add[(triton.cdiv(1000, 256),)](a, b, out, 1000, BLOCK=256)
        torch.testing.assert_close(out, a + b)
        print("triton kernel: ok")
    except Exception as error:  # noqa: BLE001
        failures.append(f"triton kernel: {type(error).__name__}: {error}")

for failure in failures:
    print("FAILED:", failure)
print("environment:", "ok" if not failures else f"{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
EOF
start=$SECONDS
CURRENT=environment CURRENT_START=$start
timeout --kill-after=10 150 "$PYTHON" "$WORK/hfx_environment.py" "$HFX_SITE" ${wheels[@]+"${wheels[@]}"} \
    >"$LOGS/environment.log" 2>&1
status=$?
CURRENT=
cat "$LOGS/environment.log"
record environment "$status" $((SECONDS - start))

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, remember the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS left=$((BUDGET - SECONDS - 15))
    echo "== $name: $*"
    if ((left < 20)); then
        echo "not run: ${left}s left of the ${BUDGET}s budget" | tee "$LOGS/$name.log"
        record "$name" skip 0
        return
    fi
    ((limit > left)) && limit=$left
    CURRENT=$name CURRENT_START=$start
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local status=$?
    CURRENT=
    tail -n 25 "$LOGS/$name.log"
    record "$name" "$status" $((SECONDS - start))
}

bench() {  # bench NAME SECONDS SCRIPT ARGS...: a benchmark script of benchmarks/ (missing: reported, not run)
    local name=$1 limit=$2 script=$3
    shift 3
    if [ ! -f "$script" ]; then
        echo "== $name: $script does not exist" | tee "$LOGS/$name.log"
        record "$name" 127 0
        return
    fi
    step "$name" "$limit" "$PYTHON" "$script" "$@"
}

# 2. The gpu tests (each system end to end on CUDA against the CPU in fp32, and in bf16; kernels against their
#    references). Only the test_gpu*.py files are collected: the other test modules import packages this machine
#    does not have.
if part tests; then
    gpu_tests=()
    for file in tests/test_gpu*.py tests/*/test_gpu*.py; do [ -f "$file" ] && gpu_tests+=("$file"); done
    if ((${#gpu_tests[@]})); then
        step gpu-tests 240 "$PYTHON" -m pytest -m gpu -p no:cacheprovider -q -rA "${gpu_tests[@]}"
    else
        echo "== gpu-tests: no tests/*/test_gpu*.py" | tee "$LOGS/gpu-tests.log"
        record gpu-tests 127 0
    fi
fi

# 3. Benchmarks (each prints `RESULT <name> <value>` lines) and 4. the main job under a 3-minute budget, in order of
#    what is still to be shown: synthesis first, then the main job with the default mix (when GPU_CHECK_PARTS names
#    it: its plan is what the GPU's speeds buy), the peak-batch decode, quanta and PEER-MLA (targets not yet met),
#    the main job's plans (when no run of it is asked for), the other benchmarks, and last the main job with half
#    generated conversations (a step that no longer fits the budget is reported "not run").
# CPU references: the same commands with --device cpu on the 2-core CI machine (docs/devices.md, "The GPU check"): 16
# per chunk with these 64 conversations, the CPU's own device-sized batch (32) for the second, and the conversations
# the main job plans there for the same budget and mix.
if part bench; then
    bench synthesis-16 75 benchmarks/cartridges_synthesis.py --random-model smollm2-135m --conversations 64 \
        --batch 16 --skip-single --device cuda --cpu-reference "${SYNTHESIS_CPU_REFERENCE:-0.944}"
    bench synthesis-device 100 benchmarks/cartridges_synthesis.py --random-model smollm2-135m --conversations 2048 \
        --batch auto --skip-single --phases --device cuda --cpu-reference "${SYNTHESIS_CPU_REFERENCE_DEVICE:-1.111}"
fi
if part main-job || part main-job-default; then
    bench main-job-default 230 benchmarks/cartridges_main_job.py --budget-minutes 3 --device cuda \
        --cpu-reference-conversations "${MAIN_JOB_CPU_REFERENCE:-64}"
fi
if part bench; then
    bench decode-peak 120 benchmarks/cartridges_decode.py --random-model llama-3.2-1b --contexts 32768 131072 \
        --p 2048 --new-tokens 128 --repeats 3 --max-seconds 12 --peak-memory-gib 60 --skip-fixed \
        --device cuda
    bench quanta-gradients 75 benchmarks/quanta_gradients.py --device cuda --random-model --tokens 64 --batch-size 32 \
        --profile 12
    bench peer-train-step 75 benchmarks/peer_mla_train_step.py --device cuda --peer-kernel triton --profile 15
    if ! part main-job && ! part main-job-default && ! part main-job-half; then  # the runs print their own plans
        bench main-job-plan 100 benchmarks/cartridges_main_job.py --plan-only --budget-minutes 3 \
            --continuation-fraction 1.0 0.5 --device cuda \
            --cpu-reference-conversations "${MAIN_JOB_CPU_REFERENCE:-64}" "${MAIN_JOB_CPU_REFERENCE_HALF:-64}"
    fi
    bench decode 60 benchmarks/cartridges_decode.py --random-model llama-3.2-1b --contexts 2048 8192 32768 \
        --p 2048 --batch 32 --new-tokens 32 --repeats 2 --device cuda
    bench peer-kernel 45 benchmarks/peer_kernel.py --device cuda
    bench lens-grpo 75 benchmarks/lens_grpo.py --random-model smollm2-135m --device cuda --steps 6 --prompts 32
fi
if part main-job || part main-job-half; then
    bench main-job-half 230 benchmarks/cartridges_main_job.py --budget-minutes 3 --continuation-fraction 0.5 \
        --device cuda --cpu-reference-conversations "${MAIN_JOB_CPU_REFERENCE_HALF:-64}"
fi

summary | tee "$LOGS/summary.md"
rm -rf "$WORK"
for entry in ${STEPS[@]+"${STEPS[@]}"}; do
    IFS='|' read -r _ status _ <<<"$entry"
    [ "$status" = 0 ] || exit 1
done
exit 0
