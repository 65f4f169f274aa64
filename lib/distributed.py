"""The process group a launcher (torchrun, `accelerate launch`) describes: which rank this is, and its backend.

`train.num_processes = N > 1` in the flow starts N processes of lib/train_entry.py through torchrun
(lib/launch.py); each joins the group here and lib/training.py wraps its model in
DistributedDataParallel. Raw DDP rather than Accelerate: the loop already owns precision, micro-batches,
checkpoints and saving, and DDP only has to add the gradient all-reduce (Accelerate would wrap the
model, optimizer and scheduler and move saving and mixed precision into its own objects).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend(world: int) -> str:
    """nccl when every process can have a GPU of its own, else gloo (CPU)."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of an initialised group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
