"""Data-parallel training processes without a launcher: the calling process is rank 0.

`train.num_processes = N > 1` makes lib.training start N - 1 worker processes (spawned, so they
re-import nothing of the parent's state) and join a torch.distributed group with them: gloo on CPU,
nccl when there is one visible GPU per process. Rank 0 stays in the caller, so everything that only
the caller can do (the MLflow on_log callback, checkpoints, the adapter, evaluation afterwards)
happens there and nothing has to be pickled but plain arguments. Under `accelerate launch` or
torchrun (one process per GPU, group already initialised) lib.training uses that group instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A worker that dies leaves the others blocked in a collective: this bounds how long (a 1.3B
# step takes seconds, so 30 minutes without one means something is wrong, not slow).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def backend(world: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of an initialised group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _visible_gpu(rank: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[rank] if visible else str(rank)


def _threads_per_process(world: int) -> int:
    # On CPU the processes share the cores: N processes each using every core thrash (measured on
    # the tiny model: more threads than cores made each step several times slower).
    return max(1, (os.cpu_count() or 1) // world)


def _bootstrap(rank: int, world: int, init_method: str, backend_name: str, target: Callable, args: tuple) -> None:
    """Entry point of worker `rank`: own GPU (if any), join the group, run `target`, leave."""
    # Before CUDA initialises in this process: each rank sees exactly one GPU, as cuda:0, so
    # lib.base_model's device_map {"": 0} puts every rank on its own card.
    os.environ["CUDA_VISIBLE_DEVICES"] = _visible_gpu(rank)
    torch.set_num_threads(_threads_per_process(world))
    dist.init_process_group(
        backend_name, init_method=init_method, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        target(*args, rank=rank, world=world)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(world: int, target: Callable, args: tuple) -> Iterator[None]:
    """Start ranks 1..world-1 running `target(*args, rank=r, world=world)`; this process is rank 0.

    `target` must be a module-level function (it is pickled by reference). On leaving, the group is
    destroyed and the workers joined; if the body raised, they are terminated instead, and a worker
    that failed makes this raise.
    """
    init_method, backend_name = f"tcp://127.0.0.1:{_free_port()}", backend(world)
    context = mp.get_context("spawn")
    workers = [
        context.Process(target=_bootstrap, args=(rank, world, init_method, backend_name, target, args), daemon=True)
        for rank in range(1, world)
    ]
    for worker in workers:
        worker.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads_per_process(world))
    ok = False
    try:
        dist.init_process_group(
            backend_name, init_method=init_method, rank=0, world_size=world, timeout=COLLECTIVE_TIMEOUT
        )
        try:
            yield
            ok = True
        finally:
            dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)
        for worker in workers:
            if not ok:
                worker.terminate()
            worker.join()
    failed = [(rank, w.exitcode) for rank, w in enumerate(workers, start=1) if w.exitcode]
    if failed:
        raise RuntimeError(f"data-parallel worker(s) failed (rank, exit code): {failed}")


def all_reduce_gradients(parameters: list[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
    """Sum every rank's gradients (one flat all-reduce, as DDP's buckets do) and `extra`, in place.

    Summing, not averaging: each rank's loss is already divided by the whole step's token count.
    """
    for p in parameters:
        if p.grad is None:  # a rank whose shard of the last micro-batch was empty
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in parameters] + [extra.reshape(-1).to(parameters[0].grad)])
    dist.all_reduce(flat)
    offset = 0
    for p in parameters:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return flat[offset:].reshape(extra.shape)
