"""LoRA training: one plain loop you can read in one sitting.

The loss each step minimises, the run's plan and the failure messages: lib/steps.py.

Resume: the micro-batch order of the whole run is a function of `train.seed`, and a checkpoint
(lib/checkpoint.py) holds the adapter, optimizer, LR schedule and RNG states after step k, so a run
resumed from it does steps k+1.. exactly as an uninterrupted run would have.

Data parallel (`train.num_processes` = N > 1, lib/distributed.py): each optimizer step's global
micro-batch of N x `batch_size` blocks is cut into N disjoint shards, one per process; every rank's
loss is divided by the whole step's token count and the gradients are summed across ranks, so N
processes x batch b make exactly the update of 1 process x batch N*b. Only rank 0 calls `on_log`,
writes checkpoints and returns a model worth saving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib import checkpoint, distributed, faults, progress
from lib.base_model import free_memory, load_base_model, load_tokenizer
from lib.config import PipelineConfig
from lib.dataset import load_prepared
from lib.lora import make_optimizer, save_pretrained, wrap_with_lora
from lib.steps import (batch_nll, count_steps, diverged_message, is_out_of_memory, micro_batch_order, oom_message,
                       validation_loss)
from lib.threads import configure_threads

log = logging.getLogger("lenta_lora.train")


@dataclass
class Progress:
    step: int  # optimizer steps done, counting those of a run this one resumed
    total: int
    eta_seconds: float  # at this process's rate so far


# on_log(step, metrics, progress): metrics go to MLflow as they are; progress is None for the final validation.
LogFn = Callable[[int, dict[str, float], Progress | None], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped and no adapter was saved."""


class OutOfMemory(RuntimeError):
    """A training step did not fit in GPU (or CPU) memory; the message says which settings to lower."""


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    tokens: int  # real (non-padding) tokens trained on
    seconds: float
    final_loss: float
    validation_loss: float | None
    history: list[dict] = field(default_factory=list)  # every step, including those before a resume
    resumed_from_step: int | None = None
    lora_targets: list[str] = field(default_factory=list)  # module names the adapter was put on (lib/lora.py)


def save_adapter(model, tokenizer, output_dir: Path) -> Path:
    """Write PEFT's own format (adapter_config.json + adapter_model.safetensors) atomically."""
    final = output_dir / "adapter"
    tmp = output_dir / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp)  # PiSSA/OLoRA: converted to a plain LoRA on the untouched base
        tokenizer.save_pretrained(tmp)
    except Exception as error:  # disk full: OSError, or safetensors' own error type
        shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoint.storage_error("the trained adapter", output_dir, error) from error
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def train_adapter(dataset_path: str, config: PipelineConfig, output_dir: str | Path, on_log: LogFn | None = None,
                  checkpoint_dir: str | Path | None = None, run_id: str | None = None,
                  on_resume: Callable[[checkpoint.Checkpoint], None] | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter on the prepared dataset; save it under `output_dir/adapter`.

    Nothing is written to `output_dir` unless training finishes with a finite loss.
    """
    output_dir = Path(output_dir)
    model, tokenizer, result = train_model(dataset_path, config, on_log, checkpoint_dir, run_id, on_resume)
    if distributed.rank_and_world()[0] != 0:  # under an external launcher: rank 0 saves
        return result
    output_dir.mkdir(parents=True, exist_ok=True)
    result.adapter_dir = str(save_adapter(model, tokenizer, output_dir))
    del model  # the next stage loads its own copy: this one must be gone first
    free_memory()
    return result


def train_model(dataset_path: str, config: PipelineConfig, on_log: LogFn | None = None,
                checkpoint_dir: str | Path | None = None, run_id: str | None = None,
                on_resume: Callable[[checkpoint.Checkpoint], None] | None = None):
    """The training loop; returns (peft model, tokenizer, TrainResult without adapter_dir).

    With `checkpoint_dir`: holds its lock, resumes from its newest checkpoint (calling `on_resume`
    first), and writes one every `train.checkpoint_every` steps and after the last step, recording
    `run_id` (the MLflow run) in each. Without it, nothing but the returned model is produced.

    `train.num_processes` > 1 starts the other ranks here (this process is rank 0); a process
    group set up by `accelerate launch` / torchrun is used as it is.
    """
    rank, world = distributed.rank_and_world()
    if world > 1:  # the launcher's ranks share the machine: lib/train_entry.py sets their threads
        return _train_loop(dataset_path, config, on_log if rank == 0 else None, checkpoint_dir, run_id, on_resume, rank, world)
    configure_threads(config.train.threads)  # N > 1 processes: process_group divides the cores instead
    world = config.train.num_processes
    if world == 1:
        return _train_loop(dataset_path, config, on_log, checkpoint_dir, run_id, on_resume)
    with distributed.process_group(world, _worker, (dataset_path, config, checkpoint_dir)):
        return _train_loop(dataset_path, config, on_log, checkpoint_dir, run_id, on_resume, 0, world)


def _worker(dataset_path: str, config: PipelineConfig, checkpoint_dir: str | Path | None, *, rank: int, world: int) -> None:
    """Ranks 1..N-1: train their shards; they resume from rank 0's checkpoints but never write any."""
    _train_loop(dataset_path, config, None, checkpoint_dir, None, None, rank, world)


def _train_loop(dataset_path: str, config: PipelineConfig, on_log: LogFn | None, checkpoint_dir: str | Path | None,
                run_id: str | None, on_resume: Callable[[checkpoint.Checkpoint], None] | None,
                rank: int = 0, world: int = 1):
    from tqdm.auto import tqdm

    info = json.loads((Path(dataset_path) / "lenta_lora_dataset.json").read_text())
    data = load_prepared(dataset_path)
    blocks, val_blocks = data["train_blocks"], data["validation_blocks"]
    tokenizer = load_tokenizer(str(Path(dataset_path) / "tokenizer"), config.model)
    train = config.train

    torch.manual_seed(train.seed)
    model = wrap_with_lora(load_base_model(info["base"], config.model), config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if world > 1:  # as DDP does at wrap time: every rank starts from rank 0's LoRA weights
        for p in trainable:
            torch.distributed.broadcast(p.data, src=0)
    log.info("trainable parameters: %d of %d", sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()))
    optimizer = make_optimizer(model, config)  # LoRA+ (lora.plus_lr_ratio): B at a higher rate than A
    targets = sorted(model.peft_config["default"].target_modules)
    steps = count_steps(len(blocks), train, world)
    # Linear warmup then linear decay to zero: the usual schedule for short LoRA runs.
    warmup = train.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    # The whole run's micro-batch order, fixed by the seed: a resumed run skips the consumed part.
    # With N ranks a micro-batch is N x batch_size blocks; rank r trains on its r-th slice.
    order = micro_batch_order(len(blocks), train.batch_size * world, train.seed, steps * train.grad_accum)
    shard = slice(rank * train.batch_size, (rank + 1) * train.batch_size)
    # Whole training set as two tensors: indexing a `datasets` table per step costs more than a tiny model's step.
    all_ids, all_masks = torch.tensor(blocks["input_ids"]), torch.tensor(blocks["attention_mask"])

    writer = checkpoint_dir if rank == 0 else None  # rank 0 alone holds the lock and writes
    # A single process whose twin (same dataset and config) is training right now trains without
    # checkpoints rather than failing: the twin's checkpoints already cover this work if either dies.
    with checkpoint.exclusive(writer, busy_ok=world == 1) if writer else contextlib.nullcontext() as held:
        if writer and held is None:
            log.warning("another live process is training with %s (same dataset and config): this run trains "
                        "without checkpoints", checkpoint_dir)
            writer = checkpoint_dir = None
        done = {"step": 0, "tokens": 0, "seconds": 0.0, "history": []}  # what earlier processes trained
        resume = checkpoint.latest(checkpoint_dir)
        if resume:
            done = checkpoint.load(resume, model, optimizer, schedule, steps)
            log.info("resuming at step %d of %d from %s (written by MLflow run %s)", resume.step, steps, resume.path, resume.run_id)
            if on_resume:
                on_resume(resume)
        elif writer:
            checkpoint.describe(checkpoint_dir, checkpoint.checkpoint_key(config, info["fingerprint"], dataset_path)[1])

        history: list[dict] = list(done["history"])
        tokens_seen, new_tokens, started = done["tokens"], 0, time.perf_counter()
        bar = tqdm(range(done["step"] + 1, steps + 1), initial=done["step"], total=steps, desc="train", unit="step",
                   disable=None if rank == 0 else True)
        # Seconds since the last step line (on_log), and since the last line of any kind (a step's or a heartbeat).
        step_lines = progress.Ticker(train.progress_interval_s, enabled=rank == 0)
        any_line = progress.Ticker(train.progress_interval_s, enabled=rank == 0)
        for step in bar:  # 1-based optimizer step
            chunk = order[(step - 1) * train.grad_accum : step * train.grad_accum]
            step_tokens = sum(int(all_masks[idx, 1:].sum()) for idx in chunk)  # targets scored this step
            # Summed on the device and read once per step: a float() per micro-batch is a GPU sync each.
            step_nll, step_started = torch.zeros((), device=model.device), time.perf_counter()
            try:
                for micro, idx in enumerate(chunk, 1):
                    if not idx[shard]:  # this rank's share of an epoch's short last micro-batch
                        continue
                    nll, _ = batch_nll(model, all_ids[idx[shard]].to(model.device), all_masks[idx[shard]].to(model.device))
                    (nll / step_tokens).backward()
                    step_nll += nll.detach()
                    if micro < len(chunk) and any_line.due():  # a slow step: say where it is (not after its last)
                        log.info("step %d/%d: micro-batch %d/%d, %.0f s into this step", step, steps, micro, len(chunk),
                                 time.perf_counter() - step_started)
                        any_line.mark()
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                raise OutOfMemory(oom_message(error, step, train, config.model)) from None
            if world > 1:
                step_nll = distributed.all_reduce_gradients(trainable, step_nll)
            loss_value = float(step_nll) / step_tokens
            lr = schedule.get_last_lr()[0]  # the rate this step's update uses (LoRA+: the A matrices')
            if not math.isfinite(loss_value):
                raise TrainingDiverged(diverged_message(loss_value, step, steps, lr, train, history))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)

            batch_tokens = sum(int(all_masks[idx].sum()) for idx in chunk)
            tokens_seen, new_tokens = tokens_seen + batch_tokens, new_tokens + batch_tokens
            elapsed = time.perf_counter() - started  # this process only: rates and ETA exclude earlier ones
            record = {"train_loss": loss_value, "learning_rate": lr, "tokens_per_second": new_tokens / elapsed,
                      "epoch": step * train.grad_accum * train.batch_size * world / len(blocks)}
            if rank == 0 and train.eval_every and step % train.eval_every == 0 and step < steps:
                record["validation_loss"] = validation_loss(model, val_blocks, config.eval.batch_size)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{record['tokens_per_second']:.0f}", refresh=False)
            history.append({"step": step, **record})
            state = {"total_steps": steps, "run_id": run_id, "tokens": tokens_seen,
                     "seconds": done["seconds"] + elapsed, "history": history}
            if on_log and (step % train.log_every == 0 or step == steps or step_lines.due()):
                eta = (steps - step) * elapsed / (step - done["step"])
                step_lines.mark()
                any_line.mark()
                try:
                    on_log(step, record, Progress(step, steps, eta))
                except BaseException:  # e.g. the tracking server went away: keep the steps done so far
                    if writer and train.checkpoint_every:
                        checkpoint.save(checkpoint_dir, step, model, optimizer, schedule, state)
                        log.warning("logging step %d failed: saved a checkpoint there to resume from", step)
                    raise
            # After on_log: a kill between the two re-trains (and re-logs) a few steps rather than losing a point.
            if writer and train.checkpoint_every and (step % train.checkpoint_every == 0 or step == steps):
                checkpoint.save(checkpoint_dir, step, model, optimizer, schedule, state)
            faults.reach(f"train.step-{step}")
        bar.close()
    seconds = done["seconds"] + time.perf_counter() - started

    val = validation_loss(model, val_blocks, config.eval.batch_size) if rank == 0 else None
    if history and val is not None:
        history[-1]["validation_loss"] = val  # the loss plot's validation line reaches the last step
    if on_log and val is not None:
        on_log(steps, {"validation_loss": val}, None)
    model.eval()
    final_loss = history[-1]["train_loss"] if history else float("nan")
    return model, tokenizer, TrainResult("", steps, tokens_seen, seconds, final_loss, val, history,
                                         resumed_from_step=resume.step if resume else None, lora_targets=targets)
