"""Training checkpoints, so that a killed run resumes where it stopped instead of starting over.

The folder is keyed by what determines the trained weights (the prepared dataset and the `model`,
`lora` and `train` config sections), not by the MLflow run id: re-running the flow with the same
config finds the checkpoints of the run that was killed.

    <data.cache_dir>/checkpoints/<key>/
        key.json             what the key hashes, for a person browsing the cache
        .lock                flock held by the process that trains with these checkpoints
        step-00000200/       one complete checkpoint (the newest KEEP are kept)
            adapter/         PEFT save_pretrained: adapter_config.json + adapter_model.safetensors
            trainer.pt       optimizer and LR-scheduler state dicts, RNG states
            state.json       step, total steps, the MLflow run that wrote it, tokens, seconds, loss history

A checkpoint is written into a `.tmp-*` folder and renamed into place when complete, so a kill
mid-write leaves the previous checkpoint intact; leftovers are removed under the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.config import PipelineConfig

log = logging.getLogger("lenta_lora.checkpoint")

KEEP = 2  # newest checkpoints kept: the last one, and one more in case the last is unreadable
# `train` keys that choose what is logged or written, not what is learned: changing them still resumes.
BOOKKEEPING = ("log_every", "progress_interval_s", "eval_every", "checkpoint_every")
STATE, TRAINER, ADAPTER = "state.json", "trainer.pt", "adapter"
# PEFT saves the whole embedding matrix beside the adapter when a target is named like an embedding
# (`lm_head`, tied to the input embeddings in GPT-Neo): meant for a resized vocabulary, which we never
# do, so it is a frozen copy of the base. The demo's head-only adapter was 3.3 MB, 3.1 MB of it that
# copy; at 1.3B it would be the 50,257 x 2,048 matrix, 412 MB in fp32, in every version and checkpoint.
ADAPTER_SAVE_OPTIONS = {"safe_serialization": True, "save_embedding_layers": False}


class CheckpointError(RuntimeError):
    """A checkpoint folder is busy, or a checkpoint does not fit the run that tries to resume from it."""


class StorageError(OSError):
    """Writing a checkpoint or an adapter failed (disk full, quota, read-only disk); nothing half-written kept."""


def storage_error(what: str, path: str | Path, error: BaseException, kept: str = "") -> StorageError:
    """A StorageError naming what was being written, where, why, and the free space left there."""
    free = "unknown"
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB"
            break
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return StorageError(
        f"could not write {what} to {path}: {reason} ({free} free there); free disk space or "
        f"point data.cache_dir at a larger disk, then run again{kept}"
    )


@dataclass
class Checkpoint:
    path: Path
    step: int  # optimizer steps done
    total_steps: int
    run_id: str | None  # the MLflow run that wrote it
    state: dict  # the whole state.json


def checkpoint_key(config: PipelineConfig, dataset_fingerprint: str, dataset_path: str) -> tuple[str, dict]:
    """16 hex digits of sha256 over the dataset and the training-relevant config; and what was hashed."""
    train = {k: v for k, v in config.train.model_dump(mode="json").items() if k not in BOOKKEEPING}
    # The dataset folder name adds the base, block length and packing that produced the blocks.
    payload = {
        "dataset": dataset_fingerprint,
        "dataset_dir": Path(dataset_path).name,
        "model": config.model.model_dump(mode="json"),
        "lora": config.lora.model_dump(mode="json"),
        "train": train,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return digest[:16], payload


def checkpoint_dir(config: PipelineConfig, dataset_fingerprint: str, dataset_path: str) -> str | None:
    """`<data.cache_dir>/checkpoints/<key>`, or None when `train.checkpoint_every` is not set. Creates nothing."""
    if not config.train.checkpoint_every:
        return None
    key, _ = checkpoint_key(config, dataset_fingerprint, dataset_path)
    return str(Path(config.data.cache_dir) / "checkpoints" / key)


@contextlib.contextmanager
def exclusive(directory: str | Path, busy_ok: bool = False) -> Iterator[Path | None]:
    """Hold the folder's lock while training with it. The kernel drops an flock when its process dies,
    so a SIGKILLed trainer never leaves a stale lock; a live one makes a second trainer fail fast,
    or, with `busy_ok`, yields None (the caller goes on without these checkpoints)."""
    import fcntl  # POSIX only; imported here so that the module still imports elsewhere

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy_ok:
                yield None
                return
            raise CheckpointError(
                f"{directory}: another process is training with this dataset and config right now (it holds "
                f"{directory / '.lock'}); wait for it to finish, or change train.seed to train a second copy"
            ) from None
        for leftover in directory.glob(".tmp-*"):  # a writer killed mid-checkpoint; nobody else writes here
            shutil.rmtree(leftover, ignore_errors=True)
        yield directory


def _complete(directory: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with their state file), oldest first."""
    found = [p for p in directory.glob("step-*") if p.is_dir() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest(directory: str | Path | None) -> Checkpoint | None:
    """The newest complete checkpoint in `directory`, or None."""
    if directory is None or not Path(directory).is_dir():
        return None
    found = _complete(Path(directory))
    if not found:
        return None
    state = json.loads((found[-1] / STATE).read_text())
    return Checkpoint(found[-1], int(state["step"]), int(state["total_steps"]), state.get("run_id"), state)


def _rng_state() -> dict:
    # Dropout draws from these; restoring them makes a resumed run draw the same masks as an unbroken one.
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk: the rename that publishes a checkpoint must not outrun its contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str | Path, step: int, model, optimizer, scheduler, state: dict, scaler=None) -> Path:
    """Write checkpoint `step` (adapter, optimizer, scheduler, RNG, `state`; fp16's GradScaler if given)
    atomically; keep the newest KEEP.

    `state` must hold `total_steps` and may hold `run_id`, `tokens`, `seconds`, `history` (JSON-able).
    """
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    tmp, started = None, time.perf_counter()
    try:
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
        model.save_pretrained(tmp / ADAPTER, **ADAPTER_SAVE_OPTIONS)
        trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
        if scaler is not None:  # its loss scale: a resumed fp16 run scales as the uninterrupted one would
            trainer["scaler"] = scaler.state_dict()
        torch.save(trainer, tmp / TRAINER)
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, ensure_ascii=False))
        for path in [*tmp.rglob("*"), tmp]:
            _fsync(path)
        if final.exists():  # the same step written before (cannot happen in one run; a manual copy could)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(directory)
    except Exception as error:  # disk full shows up as OSError, torch's RuntimeError or safetensors' own error
        previous = latest(directory)
        kept = f"; the newest complete checkpoint ({previous.path.name if previous else 'none'}) is intact"
        raise storage_error(f"checkpoint step {step}", directory, error, kept) from error
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in _complete(directory)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())  # bytes on disk, this checkpoint only
    log.info(
        "checkpoint step %d/%s written: %s in %.1f s -> %s",
        step,
        state.get("total_steps", "?"),
        _size_text(size),
        time.perf_counter() - started,
        final,
    )
    return final


def _size_text(size: int) -> str:
    """Bytes as MB, or kB below 0.1 MB (a tiny test model's checkpoint would read 0.0 MB)."""
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def load(checkpoint: Checkpoint, model, optimizer, scheduler, total_steps: int, scaler=None) -> dict:
    """Put the checkpoint's adapter weights, optimizer, scheduler and RNG states back; return its state."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if checkpoint.total_steps != total_steps:
        raise CheckpointError(
            f"{checkpoint.path}: written for a {checkpoint.total_steps}-step run but this run has {total_steps} steps "
            f"(the prepared dataset changed size?); delete {checkpoint.path.parent} to start over"
        )
    weights = load_file(checkpoint.path / ADAPTER / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"{checkpoint.path}: adapter does not fit the model (unexpected "
            f"{result.unexpected_keys[:3]}, missing {missing[:3]}); delete {checkpoint.path.parent}"
        )
    trainer = torch.load(checkpoint.path / TRAINER, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _restore_rng(trainer["rng"])
    if scaler is not None and "scaler" in trainer:
        scaler.load_state_dict(trainer["scaler"])
    return checkpoint.state


def describe(directory: str | Path, payload: dict) -> None:
    """Write key.json (what the folder's key hashes) once, so a person can tell cache folders apart."""
    path = Path(directory) / "key.json"
    if not path.is_file():
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False))


def discard(directory: str | Path | None) -> bool:
    """Delete a finished run's checkpoints (its adapter is in MLflow); skipped while a trainer holds the lock."""
    if directory is None or not Path(directory).is_dir():
        return False
    try:
        with exclusive(directory):
            shutil.rmtree(directory, ignore_errors=True)
    except CheckpointError as busy:
        log.warning("checkpoints kept: %s", busy)
        return False
    return True


@contextlib.contextmanager
def held_folders(checkpoint_dir: str | Path | None, rank: int, world: int) -> Iterator[tuple]:
    """(the folder to resume from, the folder to write to): rank 0 alone holds the lock and writes.

    A single process whose twin (same dataset and config) is training right now gets (None, None) and
    trains without checkpoints rather than failing: the twin's cover this work if either dies."""
    if checkpoint_dir is None or rank != 0:
        yield checkpoint_dir, None
        return
    with exclusive(checkpoint_dir, busy_ok=world == 1) as held:
        if held is None:
            log.warning(
                "another live process is training with %s (same dataset and config): this run trains "
                "without checkpoints",
                checkpoint_dir,
            )
        yield (checkpoint_dir, checkpoint_dir) if held else (None, None)
