"""An optimizer step, for the loop in lib/training.py: `train_step` and its pieces. The state it reads and
advances (`Run`, made once by `training.setup`; `LoopState`, what a checkpoint carries over), the loss a
step minimises (and the validation loss, the same measure on held-out blocks), the run's plan (how many
steps, which blocks each micro-batch takes), the backward pass over a step's micro-batches, and what a
step that fails says (and raises).

Loss convention: every optimizer step minimises the mean NLL over all *real* tokens of its
`grad_accum` micro-batches (each micro-batch's summed loss is divided by the step's total token
count), so the step's gradient does not depend on how the tokens were split into micro-batches.
Padding (attention_mask == 0) is never scored.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lib.config import ModelConfig, TrainConfig

if TYPE_CHECKING:
    from lib.dataset import PreparedDataset
    from lib.progress import Ticker

log = logging.getLogger("lenta_lora.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped and no adapter was saved."""


class OutOfMemory(RuntimeError):
    """A training step did not fit in GPU (or CPU) memory; the message says which settings to lower."""


@dataclass
class Run:
    """What `setup` makes once per process; fixed for the whole run."""

    model: Any  # the PEFT model (what is checkpointed and saved)
    wrapped: Any  # what forward/backward run through: DistributedDataParallel around `model` with N > 1 ranks, else it
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    info: PreparedDataset  # the prepared dataset's facts
    val_blocks: Any  # a `datasets` table
    ids: torch.Tensor  # the training blocks: two tensors index faster than a `datasets` table (per step:
    masks: torch.Tensor  # that indexing cost more than a tiny model's whole step)
    order: list[list[int]]  # block indices of every micro-batch of the run (all ranks')
    shard: slice  # this rank's part of a micro-batch
    steps: int
    world: int
    autocast_dtype: torch.dtype | None = None  # a GPU's half precision (lib/steps.mixed_precision)
    scaler: torch.amp.GradScaler | None = None  # fp16 on a GPU only


@dataclass
class LoopState:
    """How far training is: what a checkpoint carries over (step, tokens, seconds, history), and this
    process's share."""

    step: int = 0  # optimizer steps done, counting those of a run this one resumed
    tokens: int = 0  # real tokens trained on, likewise
    seconds: float = 0.0  # training time of the processes before this one
    history: list[dict] = field(default_factory=list)  # one record per step
    start_step: int = 0  # the step this process resumed after
    new_tokens: int = 0  # this process's
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds this process has trained: its rates and ETA exclude earlier ones."""
        return time.perf_counter() - self.started


def batch_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (nats) over real tokens, and how many tokens were scored (a tensor:
    reading it is a GPU sync, which the training loop avoids).

    The targets are shifted, not the logits: slicing `logits[:, :-1]` copies the largest tensor of
    the step (batch x length x vocab) for nothing.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # no-op in fp32
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-100)  # last position: nothing to predict
    scored = torch.nn.functional.pad(attention_mask[:, 1:], (0, 1)).bool()
    targets = targets.masked_fill(~scored, -100)
    nll = torch.nn.functional.cross_entropy(
        logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100, reduction="sum"
    )
    return nll, scored.sum()


@torch.no_grad()
def validation_loss(model, blocks, batch_size: int) -> float | None:
    """Mean NLL per real token over `blocks` (None when there are none); leaves the model in train mode."""
    if not len(blocks):
        return None
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        rows = blocks[start : start + batch_size]
        device = model.device
        nll, n = batch_nll(
            model, torch.tensor(rows["input_ids"], device=device), torch.tensor(rows["attention_mask"], device=device)
        )
        total, count = total + float(nll), count + int(n)
    model.train()
    return total / max(count, 1)


def count_steps(num_blocks: int, train: TrainConfig, world: int = 1) -> int:
    """Optimizer steps: `train.max_steps` if set, else epochs over the (all-rank) micro-batches."""
    if train.max_steps:
        return train.max_steps
    micro_batches = math.ceil(num_blocks / (train.batch_size * world))
    return max(1, math.ceil(train.epochs * micro_batches / train.grad_accum))


def micro_batch_order(num_blocks: int, batch_size: int, seed: int, needed: int) -> list[list[int]]:
    """Block indices of each micro-batch, reshuffled every epoch from a seeded generator."""
    order: list[list[int]] = []
    generator = torch.Generator().manual_seed(seed)
    while len(order) < needed:
        perm = torch.randperm(num_blocks, generator=generator).tolist()
        order += [perm[i : i + batch_size] for i in range(0, num_blocks, batch_size)]
    return order[:needed]


def mixed_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype, GradScaler) for training on `device`. On a GPU the half-precision compute dtype of
    `precision` (int8/nf4: their compute dtype) runs the forward under autocast, and fp16 gets a GradScaler:
    its small gradients underflow without loss scaling (bf16 has fp32's range and needs none). On CPU:
    (None, None), fp32 as before. Not run on a GPU here: the tests have none."""
    from lib.base_model import resolve_dtype

    if device.type != "cuda":
        return None, None
    dtype = resolve_dtype("auto" if precision in ("int8", "nf4") else precision)
    if dtype == torch.float32:
        return None, None
    return dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def oom_message(error: BaseException, step: int, train: TrainConfig, model: ModelConfig) -> str:
    """What ran out (GPU or RAM), in which step, and the settings to lower, most effective first."""
    first = (str(error).strip().splitlines() or ["out of memory"])[0][:160]
    advice = [
        f"lower train.batch_size (now {train.batch_size}) and raise train.grad_accum to keep the effective "
        f"batch of {train.batch_size * train.grad_accum}"
    ]
    if not model.gradient_checkpointing:
        advice.append("set model.gradient_checkpointing: true")
    on_gpu = isinstance(
        error, torch.OutOfMemoryError
    )  # CUDA's (accelerators') allocator; the CPU's raises RuntimeError
    if model.precision not in ("int8", "nf4") and on_gpu:
        advice.append("use model.precision: int8 or nf4 (quantized base weights)")
    advice.append(f"or lower train.max_length (now {train.max_length})")
    where = "GPU" if on_gpu else "CPU (RAM)"
    return (
        f"out of {where} memory in training step {step} (micro-batch {train.batch_size} x {train.max_length} "
        f"tokens, precision {model.precision}): {'; '.join(advice)}. Checkpoints written so far are kept. "
        f"[{first}]"
    )


def diverged_message(loss: float, step: int, steps: int, lr: float, train: TrainConfig, history: list[dict]) -> str:
    last = f"; last finite loss {history[-1]['train_loss']:.4g} at step {history[-1]['step']}" if history else ""
    return (
        f"training loss is {loss} at optimizer step {step} of {steps} (learning rate {lr:.3g}, "
        f"train.learning_rate={train.learning_rate:g}{last}): lower train.learning_rate (try 10x lower) "
        f"or raise train.warmup_steps, and check the data; no adapter was saved"
    )


def accumulate_gradients(
    model,
    ids: torch.Tensor,
    masks: torch.Tensor,
    chunk: list[list[int]],
    shard: slice,
    at: tuple[int, int],
    heartbeat,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """Backward over this rank's share of the step's micro-batches: (summed NLL, the whole step's scored tokens).

    `chunk` holds the step's micro-batches (block indices, all ranks'), `shard` this rank's part of each,
    `at` (step, steps) for the heartbeat line a slow step logs when `heartbeat` (a progress.Ticker) is due.
    `model` is the PEFT model, or DistributedDataParallel around it: then the gradients are all-reduced
    once per step, in the backward of the step's last micro-batch (`no_sync` on the others).
    `scaler` (fp16 on a GPU) scales the loss before backward; `autocast_dtype` runs the forward in autocast.
    The NLL is summed on the device and read once per step: a float() per micro-batch is a GPU sync each."""
    step, steps = at
    step_tokens = sum(int(masks[idx, 1:].sum()) for idx in chunk)  # targets scored this step, all ranks'
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    # DDP averages the ranks' gradients; each rank's loss is already divided by the whole step's (all ranks')
    # token count, so the sum is wanted: x world size makes DDP's mean that sum, and N processes x batch b
    # make exactly the update of 1 process x batch N*b.
    world = torch.distributed.get_world_size() if ddp else 1
    device = (model.module if ddp else model).device
    started = time.perf_counter()
    step_nll = torch.zeros((), device=device)
    for micro, idx in enumerate(chunk, 1):
        last = micro == len(chunk)
        rows, weight = idx[shard], 1.0
        if not rows:  # this rank's share of an epoch's short last micro-batch is empty
            if not (ddp and last):
                continue
            # ... but the step's all-reduce happens in this backward, and every rank must join it: a
            # zero-weight pass over one block adds nothing to the gradients.
            rows, weight = idx[:1], 0.0
        with contextlib.nullcontext() if last or not ddp else model.no_sync():
            with torch.autocast(device.type, autocast_dtype) if autocast_dtype else contextlib.nullcontext():
                nll, _ = batch_nll(model, ids[rows].to(device), masks[rows].to(device))
            loss = nll / step_tokens * (weight * world)  # x 1.0 (one process) is exact
            (scaler.scale(loss) if scaler else loss).backward()
        step_nll += nll.detach() * weight
        if not last and heartbeat.due():  # a slow step: say where it is (not after its last)
            log.info(
                "step %d/%d: micro-batch %d/%d, %.0f s into this step",
                step,
                steps,
                micro,
                len(chunk),
                time.perf_counter() - started,
            )
            heartbeat.mark()
    return step_nll, step_tokens


def train_step(
    run: Run, state: LoopState, step: int, train: TrainConfig, model_cfg: ModelConfig, heartbeat: Ticker
) -> dict[str, float]:
    """Optimizer step `step` (1-based): advances `state` and returns the step's metrics. Raises OutOfMemory
    with the settings to lower, or TrainingDiverged on a non-finite loss, before any weight changed."""
    chunk = run.order[(step - 1) * train.grad_accum : step * train.grad_accum]
    try:
        at = (step, run.steps)
        step_nll, step_tokens = accumulate_gradients(
            run.wrapped, run.ids, run.masks, chunk, run.shard, at, heartbeat, run.scaler, run.autocast_dtype
        )
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise OutOfMemory(oom_message(error, step, train, model_cfg)) from None
    if run.world > 1:  # the gradients are summed already (DDP); the logged loss needs every rank's NLL too
        torch.distributed.all_reduce(step_nll)
    loss = float(step_nll) / step_tokens  # unscaled: a GradScaler skips steps with inf gradients itself
    lr = run.schedule.get_last_lr()[0]  # the rate this step's update uses (LoRA+: the A matrices')
    if not math.isfinite(loss):
        raise TrainingDiverged(diverged_message(loss, step, run.steps, lr, train, state.history))
    if run.scaler is not None:  # unscales, skips the update if a gradient overflowed, then adapts the scale
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(run.masks[idx].sum()) for idx in chunk)
    state.step, state.tokens, state.new_tokens = step, state.tokens + tokens, state.new_tokens + tokens
    return {
        "train_loss": loss,
        "learning_rate": lr,
        "tokens_per_second": state.new_tokens / state.elapsed(),
        "epoch": step * train.grad_accum * train.batch_size * run.world / len(run.ids),
    }
