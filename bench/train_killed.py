"""``cli.py train-vision ARGS``, SIGKILLed just before it writes the checkpoint of step K: the worst
moment for a resume (steps after the previous checkpoint are lost and must be redone exactly once).

    python bench/train_killed.py K train-vision --shards ... --out ...   (bench/gpu_smoke.py runs it; exit -9)
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402
from pipeline.pretrain import state as train_state  # noqa: E402


def main() -> None:
    kill_at = f"step-{int(sys.argv[1]):08d}.pt"
    save = train_state.save_checkpoint

    def save_or_die(path, payload):
        if Path(path).name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        save(path, payload)

    train_state.save_checkpoint = save_or_die
    sys.argv = ["mflag", *sys.argv[2:]]  # ARGS start with the command, train-vision
    cli.main()


if __name__ == "__main__":
    main()
