import pytest

from hfx.launch import requested_cpu_processes

LAUNCHER = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "train.py"]


@pytest.fixture
def single_cpu_launch(monkeypatch):
    """The environment accelerate's simple CPU launcher gives its one process when asked for several."""
    for name in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    return monkeypatch


def test_the_requested_process_count_is_read_from_the_launcher(single_cpu_launch):
    assert requested_cpu_processes(LAUNCHER) == 2
    assert requested_cpu_processes([*LAUNCHER[:4], "--num-processes=3", "train.py"]) == 3
    assert requested_cpu_processes(["python", "train.py"]) is None  # not launched by accelerate


def test_no_relaunch_inside_a_distributed_job_or_without_cpu(single_cpu_launch):
    single_cpu_launch.setenv("WORLD_SIZE", "2")  # torchrun (or our relaunch) already started the processes
    assert requested_cpu_processes(LAUNCHER) is None
    single_cpu_launch.delenv("WORLD_SIZE")
    single_cpu_launch.setenv("ACCELERATE_USE_CPU", "False")
    assert requested_cpu_processes(LAUNCHER) is None
    single_cpu_launch.setenv("ACCELERATE_USE_CPU", "True")
    single_cpu_launch.delenv("MASTER_ADDR")  # accelerate sets it only when more than one process is asked for
    assert requested_cpu_processes(LAUNCHER) is None
