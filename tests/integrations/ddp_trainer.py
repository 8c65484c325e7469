"""Run by test_trainer.py under torchrun (2 CPU processes, gloo): the Trainer with DDP on an adapted tiny Llama.

python -m torch.distributed.run --nproc_per_node=2 ddp_trainer.py OUT MAX_STEPS [resume]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
from trainer_helpers import adapted, train  # noqa: E402


def main() -> None:
    out, steps = sys.argv[1], int(sys.argv[2])
    resume = len(sys.argv) > 3
    model = adapted("lora")
    trainer = train(model, out, resume=True if resume else None, max_steps=steps, per_device_train_batch_size=2)
    assert trainer.args.world_size == 2, trainer.args.world_size
    trainer.save_model(str(Path(out) / "final"))
    # Leave without tearing down: in torch 2.13 the gloo group's destructor runs at exit holding the GIL and joins a
    # worker thread that may be waiting for the GIL to free a tensor of the last collective. Here that hung 4 runs
    # of 30 (with destroy_process_group) or aborted 1 in 5 (without): pytorch/pytorch#190489. Both ranks have
    # saved when the barrier returns, and the files are closed, so nothing is lost by exiting at once.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
