"""Synthesize self-study conversations for a cartridge, one process per GPU under accelerate.

    accelerate launch --num_processes 4 examples/cartridges/synthesize.py --corpus rcv1 \\
        --synthesis_dir outputs/synthesis-rcv1 --num_conversations 4096

Each process synthesizes every N-th shard on its own device (accelerate's `PartialState().device`); the shards are
those of a one-process run (the conversations depend only on the seed and the batch), so the dataset is the same
whatever N is, and a killed run resumes from the shards already written. On a CPU-only machine add `--cpu`
(`--cpu --num_processes 2` starts two gloo processes). Every option of `hfx cartridge synthesize` applies
(`--help`), `--config file.yaml` included.
"""

from hfx.cli import main as hfx_main
from hfx.launch import relaunch_cpu_processes


def main() -> None:
    relaunch_cpu_processes()
    import sys

    hfx_main(["cartridge", "synthesize", *sys.argv[1:]])


if __name__ == "__main__":
    main()
