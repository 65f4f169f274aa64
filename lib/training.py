"""LoRA training: one plain loop in named phases; `_train_loop` reads as their table of contents.

    setup       the data as tensors, the base with its LoRA adapter, optimizer, LR schedule, micro-batch order
    resume      from the newest checkpoint, if any (rank 0 holds the folder's lock: `checkpoint.held_folders`)
    train_step  one optimizer step over its micro-batches (lib/steps.py, with the loss, the failure messages
                and the `Run` / `LoopState` a step reads and advances)
    report      a step's metrics to `on_log`; then `save_checkpoint`, and at the end `final_validation`

Resume: the micro-batch order of the whole run is a function of `train.seed`, and a checkpoint
(lib/checkpoint.py) holds the adapter, optimizer, LR schedule and RNG states after step k, so a run
resumed from it does steps k+1.. exactly as an uninterrupted run would have.

Data parallel (`train.num_processes` = N > 1): `train_adapter` starts N ranks of lib/train_entry.py
through torchrun (lib/launch.py). Each wraps the model in DistributedDataParallel and trains a disjoint
shard of every global micro-batch of N x `batch_size` blocks; DDP all-reduces the gradients once per step
(lib/steps.py), so N processes x batch b make exactly the update of 1 process x batch N*b. Only rank 0
calls `on_log`, writes checkpoints and saves the adapter. On a GPU the forward runs under autocast, and
fp16 scales the loss with a GradScaler that the checkpoints carry (lib/steps.mixed_precision).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from lib import checkpoint, distributed, faults, progress
from lib.base_model import free_memory, load_base_model, load_tokenizer
from lib.config import PipelineConfig
from lib.dataset import load_prepared, read_prepared
from lib.lora import make_optimizer, save_adapter, wrap_with_lora
from lib.steps import LoopState, Run, count_steps, micro_batch_order, mixed_precision, train_step, validation_loss
from lib.threads import configure_threads
from lib.train_result import LogFn, Progress, TrainResult

log = logging.getLogger("lenta_lora.train")


def train_adapter(
    dataset_path: str,
    config: PipelineConfig,
    output_dir: str | Path,
    on_log: LogFn | None = None,
    checkpoint_dir: str | Path | None = None,
    run_id: str | None = None,
    on_resume: Callable[[checkpoint.Checkpoint], None] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on the prepared dataset; save it under `output_dir/adapter`.

    Nothing is written to `output_dir` unless training finishes with a finite loss.
    """
    if config.train.num_processes > 1 and distributed.rank_and_world()[1] == 1:
        from lib import launch  # N ranks through torchrun; this process relays their progress

        return launch.train_with_launcher(dataset_path, config, output_dir, on_log, checkpoint_dir, run_id, on_resume)
    output_dir = Path(output_dir)
    model, tokenizer, result = train_model(dataset_path, config, on_log, checkpoint_dir, run_id, on_resume)
    if distributed.rank_and_world()[0] != 0:  # under an external launcher: rank 0 saves
        return result
    output_dir.mkdir(parents=True, exist_ok=True)
    result.adapter_dir = str(save_adapter(model, tokenizer, output_dir))
    del model  # the next stage loads its own copy: this one must be gone first
    free_memory()
    return result


def train_model(
    dataset_path: str,
    config: PipelineConfig,
    on_log: LogFn | None = None,
    checkpoint_dir: str | Path | None = None,
    run_id: str | None = None,
    on_resume: Callable[[checkpoint.Checkpoint], None] | None = None,
):
    """The training loop in this process; returns (peft model, tokenizer, TrainResult without adapter_dir).

    With `checkpoint_dir`: holds its lock, resumes from its newest checkpoint (calling `on_resume`
    first), and writes one every `train.checkpoint_every` steps and after the last step, recording
    `run_id` (the MLflow run) in each. Without it, nothing but the returned model is produced.

    Inside a process group (torchrun / `accelerate launch`, lib/train_entry.py) this process trains its
    rank's shard; `train.num_processes` > 1 outside one goes through `train_adapter` (the launcher).
    """
    rank, world = distributed.rank_and_world()
    if world > 1:  # the launcher's ranks share the machine: lib/train_entry.py sets their threads
        return _train_loop(
            dataset_path, config, on_log if rank == 0 else None, checkpoint_dir, run_id, on_resume, rank, world
        )
    if config.train.num_processes > 1:
        raise ValueError("train.num_processes > 1 starts processes through a launcher: call train_adapter")
    configure_threads(config.train.threads)
    return _train_loop(dataset_path, config, on_log, checkpoint_dir, run_id, on_resume)


def _train_loop(
    dataset_path: str,
    config: PipelineConfig,
    on_log: LogFn | None,
    checkpoint_dir: str | Path | None,
    run_id: str | None,
    on_resume: Callable[[checkpoint.Checkpoint], None] | None,
    rank: int = 0,
    world: int = 1,
):
    from tqdm.auto import tqdm

    train = config.train
    run = setup(dataset_path, config, rank, world)
    with checkpoint.held_folders(checkpoint_dir, rank, world) as (folder, writer):
        found, state = resume(run, folder, writer, config, dataset_path, on_resume)
        bar = tqdm(
            range(state.step + 1, run.steps + 1),
            initial=state.step,
            total=run.steps,
            desc="train",
            unit="step",
            disable=None if rank == 0 else True,
        )
        # Seconds since the last step line (on_log), and since the last line of any kind (a step's or a heartbeat).
        step_lines = progress.Ticker(train.progress_interval_s, enabled=rank == 0)
        any_line = progress.Ticker(train.progress_interval_s, enabled=rank == 0)
        for step in bar:  # 1-based optimizer step
            record = train_step(run, state, step, train, config.model, any_line)
            if rank == 0 and train.eval_every and step % train.eval_every == 0 and step < run.steps:
                record["validation_loss"] = validation_loss(run.model, run.val_blocks, config.eval.batch_size)
            bar.set_postfix(
                loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}", refresh=False
            )
            state.history.append({"step": step, **record})
            if on_log and (step % train.log_every == 0 or step == run.steps or step_lines.due()):
                step_lines.mark()
                any_line.mark()
                report(on_log, record, run, state, writer if train.checkpoint_every else None, run_id)
            # After on_log: a kill between the two re-trains (and re-logs) a few steps rather than losing a point.
            if writer and train.checkpoint_every and (step % train.checkpoint_every == 0 or step == run.steps):
                save_checkpoint(writer, run, state, run_id)
            if rank == 0:  # the writer: other ranks dying first could stop it mid-checkpoint
                faults.reach(f"train.step-{step}")
        bar.close()
    seconds = state.seconds + state.elapsed()
    val = final_validation(run, state, on_log, config.eval.batch_size) if rank == 0 else None
    run.model.eval()
    final_loss = state.history[-1]["train_loss"] if state.history else float("nan")
    return (
        run.model,
        run.tokenizer,
        TrainResult(
            "",
            run.steps,
            state.tokens,
            seconds,
            final_loss,
            val,
            state.history,
            resumed_from_step=found.step if found else None,
            lora_targets=sorted(run.model.peft_config["default"].target_modules),
        ),
    )


def setup(dataset_path: str, config: PipelineConfig, rank: int, world: int) -> Run:
    """The data as tensors; the base with its LoRA adapter; the optimizer, LR schedule and micro-batch order."""
    from transformers import get_linear_schedule_with_warmup

    info = read_prepared(dataset_path)
    data = load_prepared(dataset_path)
    blocks, train = data["train_blocks"], config.train
    tokenizer = load_tokenizer(info.tokenizer_dir, config.model)
    torch.manual_seed(train.seed)
    model = wrap_with_lora(load_base_model(info.base, config.model), config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = model
    if world > 1:  # DDP broadcasts rank 0's weights at wrap time; its gradient buckets hold the LoRA ones only
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[model.device] if model.device.type == "cuda" else None,
            # The base's buffers are constants, equal on every rank; broadcasting them would add a collective
            # to every forward, and a rank that skips an empty shard would do fewer of them than the others.
            broadcast_buffers=False,
        )
    autocast_dtype, scaler = mixed_precision(config.model.precision, model.device)
    log.info(
        "trainable parameters: %d of %d", sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    )
    optimizer = make_optimizer(model, config)  # LoRA+ (lora.plus_lr_ratio): B at a higher rate than A
    steps = count_steps(len(blocks), train, world)
    # transformers' linear warmup from 0 then decay to 0 (HF Trainer's): with warmup_steps w > 0 the first update runs
    # at lr 0 (it only fills AdamW's moments), the full rate comes at update w + 1; w = 0 decays from the full rate.
    schedule = get_linear_schedule_with_warmup(optimizer, train.warmup_steps, steps)
    # The whole run's micro-batch order, fixed by the seed: a resumed run skips the consumed part.
    # With N ranks a micro-batch is N x batch_size blocks; rank r trains on its r-th slice.
    order = micro_batch_order(len(blocks), train.batch_size * world, train.seed, steps * train.grad_accum)
    return Run(
        model,
        wrapped,
        tokenizer,
        optimizer,
        schedule,
        info,
        data["validation_blocks"],
        torch.tensor(blocks["input_ids"]),
        torch.tensor(blocks["attention_mask"]),
        order,
        slice(rank * train.batch_size, (rank + 1) * train.batch_size),
        steps,
        world,
        autocast_dtype,
        scaler,
    )


def resume(
    run: Run,
    folder: str | Path | None,
    writer: str | Path | None,
    config: PipelineConfig,
    dataset_path: str,
    on_resume: Callable[[checkpoint.Checkpoint], None] | None,
) -> tuple[checkpoint.Checkpoint | None, LoopState]:
    """Put the newest checkpoint in `folder` back into the model, optimizer, schedule and RNGs; or start afresh."""
    found = checkpoint.latest(folder)
    if not found:
        if writer:
            checkpoint.describe(writer, checkpoint.checkpoint_key(config, run.info.fingerprint, dataset_path)[1])
        return None, LoopState()
    done = checkpoint.load(found, run.model, run.optimizer, run.schedule, run.steps, run.scaler)
    log.info(
        "resuming at step %d of %d from %s (written by MLflow run %s)", found.step, run.steps, found.path, found.run_id
    )
    if on_resume:
        on_resume(found)
    return found, LoopState(
        done["step"], done["tokens"], done["seconds"], list(done["history"]), start_step=done["step"]
    )


def report(
    on_log: LogFn, record: dict[str, float], run: Run, state: LoopState, writer: str | Path | None, run_id: str | None
) -> None:
    """Send step `state.step`'s metrics to on_log. If that fails (say the tracking server went away),
    checkpoint the step into `writer` first: the steps done so far are kept."""
    eta = (run.steps - state.step) * state.elapsed() / (state.step - state.start_step)
    try:
        on_log(state.step, record, Progress(state.step, run.steps, eta))
    except BaseException:
        if writer:
            save_checkpoint(writer, run, state, run_id)
            log.warning("logging step %d failed: saved a checkpoint there to resume from", state.step)
        raise


def save_checkpoint(folder: str | Path, run: Run, state: LoopState, run_id: str | None) -> None:
    """Checkpoint after step `state.step`, recording `run_id` (the MLflow run) and what LoopState carries over."""
    checkpoint.save(
        folder,
        state.step,
        run.model,
        run.optimizer,
        run.schedule,
        {
            "total_steps": run.steps,
            "run_id": run_id,
            "tokens": state.tokens,
            "seconds": state.seconds + state.elapsed(),
            "history": state.history,
        },
        run.scaler,
    )


def final_validation(run: Run, state: LoopState, on_log: LogFn | None, batch_size: int) -> float | None:
    """The trained adapter's validation loss, also put on the last step's record (the loss plot's
    validation line reaches it) and sent to on_log."""
    val = validation_loss(run.model, run.val_blocks, batch_size)
    if state.history and val is not None:
        state.history[-1]["validation_loss"] = val
    if on_log and val is not None:
        on_log(run.steps, {"validation_loss": val}, None)
    return val
