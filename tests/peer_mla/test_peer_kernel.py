"""The PEER Triton kernel of hub_kernels/peer: values and gradients against `peer_experts_reference`, the
`kernels` build layout, `kernelize` of a PeerMla model, and a model whose config names the kernel's Hub repository
kernelized from the Hub cache; last, hfx's wheel installed into a fresh venv kernelizes with the kernel it ships.

Triton picks compiled vs interpreted kernels when they are defined, so the numerical checks run in a separate
process (tests/peer_mla/kernel_peer_checks.py) with TRITON_INTERPRET=1, which runs the kernels on CPU tensors;
this module only asserts on the JSON it prints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from hfx.peer_mla.hub import PEER_KERNEL_REPO_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNEL_REPO = REPO_ROOT / "hub_kernels" / "peer"
CHECKS = Path(__file__).with_name("kernel_peer_checks.py")
MARKER = "PEER_RESULTS "

FP32_TOL = 1e-5  # max |kernel - reference| / max |reference|, reference in float64
BF16_TOL = 2e-2
GRADS = ("grad_hidden_states", "grad_expert_weights", "grad_down_proj", "grad_up_proj")


def run_checks(
    mode: str, interpret: bool, *args: str, env_extra: dict | None = None, python: str | None = None
) -> dict:
    """Run kernel_peer_checks.py ``mode`` in a fresh process: with this checkout's hfx, or (``python``, another
    interpreter) with whatever hfx that interpreter has, run outside the checkout."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if python is None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)
    env.update(env_extra or {})
    proc = subprocess.run(
        [python or sys.executable, str(CHECKS), mode, *args],
        cwd=REPO_ROOT if python is None else Path(python).parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"{CHECKS.name} {mode} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len(MARKER) :])


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return run_checks("interpreter", interpret=True)


def result_of(results: dict, name: str) -> dict:
    result = results[name]
    if "error" in result:
        pytest.fail(f"check {name} raised:\n{result['error']}")
    return result


def test_build_layout():
    """The local repository resolves, for the `kernels` version installed here, to a noarch variant whose package
    is the torch-ext source tree (linked, not copied), and build.toml parses."""
    from kernels._rust import Build
    from kernels.resolver import resolve_local_kernel

    build = Build.open(KERNEL_REPO)
    assert sorted(str(b) for b in build.general.backends) == ["cpu", "cuda"]
    for variant, backend in (("torch-cpu", "cpu"), ("torch-cuda", "cuda")):
        package = KERNEL_REPO / "build" / variant / "peer"
        assert package.is_symlink() and package.resolve() == (KERNEL_REPO / "torch-ext" / "peer").resolve()
        metadata = json.loads((KERNEL_REPO / "build" / variant / "metadata.json").read_text())
        assert metadata["name"] == "peer" and metadata["backend"]["type"] == backend
    local = resolve_local_kernel(KERNEL_REPO, backend="cpu")
    assert local.variant_str == "torch-cpu"
    assert str(local.metadata.name) == "peer" and local.metadata.version == 1


def test_kernel_loads_under_interpreter(interpreter_results):
    assert interpreter_results["interpreted"] is True
    layout = result_of(interpreter_results, "layout")
    assert layout["name"] == "peer" and layout["variant"] in ("torch-cpu", "torch-cuda")


@pytest.mark.parametrize(
    "case",
    [
        "fp32_m1_gelu",
        "fp32_m1_relu",
        "fp32_m1_gelu_tanh",
        "fp32_m2_silu",
        "fp32_m2_gelu_tanh",
        "fp32_m2_identity_int32",
        "fp32_tiled_m2_gelu",
        "fp32_tiled_m1_relu",
        "compile",
    ],
)
def test_fp32_values_and_gradients(interpreter_results, case):
    result = result_of(interpreter_results, case)
    for key in ("out", *GRADS):
        assert result[key] < FP32_TOL, (case, key, result)


@pytest.mark.parametrize(
    "case, present",
    [
        ("fp32_m2_only_experts", ("grad_down_proj", "grad_up_proj")),
        ("fp32_m1_only_inputs", ("grad_hidden_states", "grad_expert_weights")),
    ],
)
def test_fp32_partial_gradients(interpreter_results, case, present):
    result = result_of(interpreter_results, case)
    assert set(present) == {key for key in GRADS if key in result}
    for key in ("out", *present):
        assert result[key] < FP32_TOL, (case, key, result)


@pytest.mark.parametrize("case", ["bf16_m1_gelu", "bf16_m2_silu"])
def test_bf16(interpreter_results, case):
    result = result_of(interpreter_results, case)
    assert result["out_dtype"] == "torch.bfloat16"
    for key in ("out", *GRADS):
        assert result[key] < BF16_TOL, (case, key, result)
        if key != "out":
            assert result[key + "_dtype"] == "torch.bfloat16"


def test_empty_batch(interpreter_results):
    result = result_of(interpreter_results, "empty")
    assert result == {"shape": [0, 32], "grad_down_zero": True}


def test_custom_op_registration(interpreter_results):
    result = result_of(interpreter_results, "opcheck")
    assert set(result.values()) == {"SUCCESS"}, result


def test_kernelize_peer_mla(interpreter_results):
    result = result_of(interpreter_results, "kernelize")
    assert result["num_peer_experts"] == 2
    assert all(result["replaced"]) and all(result["reference_untouched"])
    assert result["kernel_calls"] == {"forward": 2, "backward": 2}
    assert result["logits"] < FP32_TOL
    assert result["loss"] < 1e-5
    assert len(result["expert_grads"]) == 4 and not result["grad_errors_missing"]
    assert result["max_grad_error"] < 1e-4, result


def test_kernelize_modes(interpreter_results):
    result = result_of(interpreter_results, "kernelize_modes")
    assert all(result.values()), result


def test_pretraining_kernelizes_only_the_expert_banks(interpreter_results):
    result = result_of(interpreter_results, "pretrain_kernelize")
    assert result["choice"] == "triton" and result["swapped"] == 1 and result["activation_untouched"]
    assert result["loss"] < 1e-5 and result["max_grad_error"] < 1e-4, result


@pytest.fixture(scope="module")
def compiled_results() -> dict:
    return run_checks("no-interpreter", interpret=False)


def test_cpu_tensors_need_the_interpreter(compiled_results):
    assert compiled_results["interpreted"] is False
    assert "TRITON_INTERPRET=1" in compiled_results["cpu_call"]
    assert "Unknown expert activation" in compiled_results["bad_activation"]


def test_kernels_compile_for_cuda(compiled_results):
    """Ahead-of-time CUDA compilation (sm_90) of every kernel specialisation; runs without a GPU."""
    result = compiled_results["cuda_codegen"]
    if "error" in result and "ptxas" in result["error"].lower():
        pytest.skip("Triton's ptxas is not available")
    result = result_of(compiled_results, "cuda_codegen")
    assert result["compiled"] == 2 * (1 + 2 * 5 + 3)
    assert len(result["kernels"]) == 4


# --- a model whose config names the kernel's Hub repository ------------------------------------------------------

HUB_REPO_ID = "hfx-test/peer-kernel"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache: Path, repo_id: str) -> Path:
    """The Hub cache as `kernels.get_kernel(repo_id, version=1)` leaves it after downloading what `hfx peer-mla
    push-kernel` uploads to the branch v1: refs/v1 names a commit whose snapshot holds that folder."""
    from huggingface_hub.file_download import repo_folder_name

    from hfx.peer_mla.hub import push_peer_kernel

    folder = cache / repo_folder_name(repo_id=repo_id, repo_type="kernel")
    result = push_peer_kernel(repo_id, KERNEL_REPO, dry_run_dir=folder / "snapshots" / HUB_COMMIT)
    (folder / "refs").mkdir()
    (folder / "refs" / result["revision"]).write_text(HUB_COMMIT)
    return folder


@pytest.fixture(scope="module")
def hub_cache_results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub-cache")
    populate_hub_cache(root / "hub", HUB_REPO_ID)
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(root / "hub"),
        "HF_MODULES_CACHE": str(root / "modules"),
    }
    for name in ("KERNELS_CACHE", "LOCAL_KERNELS", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.get(name) and env.update({name: ""})
    return run_checks("hub-cache", True, HUB_REPO_ID, env_extra=env)


def test_kernelize_takes_the_configured_repository_from_the_hub_cache(hub_cache_results):
    """A model folder loaded with trust_remote_code (its exported code) whose config names the repository:
    `model.kernelize_peer_experts()` swaps in the kernel loaded through `kernels.get_kernel` from the Hub cache,
    offline, and a training step matches the PyTorch path."""
    result = result_of(hub_cache_results, "kernelize_method")
    assert result["config"] == [HUB_REPO_ID, None]
    assert result["model_module"].startswith("transformers_modules.")
    assert result["swapped"] == 2 and result["from_hub_cache"] and result["layer_file"] == "layers.py"
    assert result["logits"] < FP32_TOL and result["loss"] < 1e-5 and result["max_grad_error"] < 1e-4, result


def test_use_kernels_and_a_revision_take_it_too(hub_cache_results):
    use_kernels = result_of(hub_cache_results, "use_kernels")
    assert use_kernels["from_hub_cache"] and not use_kernels["training"]
    assert use_kernels["logits"] < FP32_TOL, use_kernels
    at_revision = result_of(hub_cache_results, "at_revision")
    assert at_revision == {"swapped": 2, "from_hub_cache": True}


def test_a_repository_not_in_the_cache_raises_or_is_skipped_with_a_warning(hub_cache_results):
    result = result_of(hub_cache_results, "not_cached")
    assert "hfx-test/not-cached" in result["raised"] and "local cache" in result["raised"], result
    assert result["use_kernels_forwards"] == ["own", "own"]
    assert any("hfx-test/not-cached" in w and "keep their PyTorch forward" in w for w in result["warnings"])


# --- hfx installed from its wheel -------------------------------------------------------------------------------

WHEEL_SOURCES = ("pyproject.toml", "README.md", "src", "model_cards", "hub_kernels")
PACKAGED = "hfx/hub_kernels/peer/"


def run_or_fail(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return done.stdout


def build_wheel(out: Path) -> Path:
    """hfx's wheel, built offline (no isolation: the build backend comes from this venv) from a copy of the sources,
    so that nothing is written into the checkout."""
    source = out / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    run_or_fail([*command, "-w", str(out / "dist"), str(source)])
    (wheel,) = (out / "dist").glob("hfx-*.whl")
    return wheel


def fresh_venv_with(wheel: Path, venv: Path) -> Path:
    """A new venv holding ``wheel`` (installed without its dependencies) that reads its dependencies from this
    venv's site-packages through a plain path in a .pth file: that folder's own .pth files, the editable install's
    among them, are not processed there, so this checkout's src/ stays off sys.path."""
    run_or_fail([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    # Installed before the dependencies are visible: pip then sees no other hfx to replace.
    run_or_fail(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ]
    )
    fresh_site = run_or_fail(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    ).strip()
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (Path(fresh_site) / "hfx_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.mark.integration
def test_the_wheel_ships_the_kernel_and_an_installed_hfx_kernelizes_with_it(tmp_path):
    """hfx's wheel holds the kernel repository, links resolved into files; installed into a fresh venv (not the
    editable checkout), `kernelize_peer_experts` finds it in the installed package and a training step of a tiny
    PeerMla under the Triton interpreter matches the PyTorch path."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs to run from a venv, whose site-packages the fresh venv borrows")
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for variant in ("torch-cpu", "torch-cuda"):
        assert {
            f"{PACKAGED}build/{variant}/metadata.json",
            f"{PACKAGED}build/{variant}/peer/layers.py",
        } <= names
    assert {
        f"{PACKAGED}README.md",
        f"{PACKAGED}build.toml",
        f"{PACKAGED}torch-ext/peer/_peer_triton.py",
    } <= names

    venv = tmp_path / "venv"
    python = fresh_venv_with(wheel, venv)
    env = {PEER_KERNEL_REPO_ENV: "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = result_of(run_checks("installed", True, env_extra=env, python=str(python)), "installed")
    site = venv.resolve() / "lib"
    assert Path(result["hfx_file"]).resolve().is_relative_to(site), result["hfx_file"]
    assert str(REPO_ROOT / "src") not in result["sys_path"]
    kernel_repo = Path(result["kernel_repo"])
    assert kernel_repo.is_relative_to(site) and kernel_repo.parts[-3:] == ("hfx", "hub_kernels", "peer")
    assert result["links_in_kernel_repo"] == []
    assert result["swapped"] == 2
    assert all(Path(f).is_relative_to(kernel_repo / "build") for f in result["layer_files"]), result[
        "layer_files"
    ]
    assert "build/torch-cpu/peer/layers.py" in result["staged_files"]
    assert result["logits"] < FP32_TOL and result["loss"] < 1e-5 and result["max_grad_error"] < 1e-4, result
