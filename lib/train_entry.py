"""Train-only entry point for launchers that start one process per GPU (`accelerate launch`,
`torchrun`), on one machine or several:

    accelerate launch --multi_gpu --num_processes 8 -m lib.train_entry \\
        --config configs/gpt-neo-1.3b-fast.yaml --dataset <prepared dataset folder> --output <folder> \\
        [--checkpoint-dir <folder>] [--tracking-uri <uri> --run-id <MLflow run id>] [--set key=value ...]

Every rank joins the group the launcher describes in its environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and trains its shard of every step (lib/training.py); rank 0 alone logs
to the MLflow run, writes checkpoints and saves the adapter, then prints one JSON line with the
result. The dataset is prepared once beforehand, by the flow's prepare stage (any folder under
`data.cache_dir/datasets`). `train.num_processes` is ignored here: the launcher sets the world size.

With `--report <folder>` (how the flow runs it, lib/launch.py) rank 0 logs nothing to MLflow: it
appends each step's metrics and a resume to <folder>/events.jsonl for the task process to relay,
and writes <folder>/outcome.json last, atomically: the TrainResult or the error that stopped it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib.train_entry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="profile YAML (configs/...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, repeatable")
    parser.add_argument("--dataset", required=True, help="a prepared dataset folder (has lenta_lora_dataset.json)")
    parser.add_argument("--output", required=True, help="folder for the adapter (rank 0 writes <output>/adapter)")
    parser.add_argument("--checkpoint-dir", default=None, help="resume from / write checkpoints here")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of --run-id")
    parser.add_argument("--run-id", default=None, help="MLflow run that rank 0 logs the loss curve into")
    parser.add_argument("--report", default=None, help="folder for events.jsonl and outcome.json (lib/launch.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if world > 1 and visible and "," in visible:  # before CUDA starts: this rank sees only its own GPU, as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local]

    import torch
    import torch.distributed as dist

    from lib import distributed, store, training
    from lib.config import load_config

    # As many processes as the launcher started (what the checkpoint folder's key.json records).
    config = load_config(args.config, [*args.set, f"train.num_processes={world}"])
    if world > 1:
        if distributed.backend(1) == "gloo":  # CPU: the ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(distributed.backend(1), timeout=timedelta(minutes=30))  # env:// from the launcher
    on_log = on_resume = None
    report = Path(args.report) if args.report and rank == 0 else None
    if report:
        on_log = lambda step, record, progress: _event(  # noqa: E731
            report, kind="log", step=step, record=record, progress=progress and asdict(progress)
        )
        on_resume = lambda found: _event(  # noqa: E731
            report,
            kind="resume",
            path=str(found.path),
            at=[found.step, found.total_steps, found.run_id],
            state={k: v for k, v in found.state.items() if k != "history"},
        )
    elif rank == 0 and args.run_id:
        from lib import tracking

        uri = store.resolve_tracking_uri(args.tracking_uri)
        on_log = lambda step, record, progress: tracking.log_metrics(uri, args.run_id, record, step=step)  # noqa: E731
    try:
        result = training.train_adapter(
            args.dataset,
            config,
            args.output,
            on_log=on_log,
            checkpoint_dir=args.checkpoint_dir,
            run_id=args.run_id,
            on_resume=on_resume,
        )
    except Exception as error:
        if report:  # the task process raises it again, with its type and message
            _outcome(report, {"error": {"type": type(error).__name__, "message": str(error)}})
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()
    if report:
        _outcome(report, {"result": asdict(result)})
    if rank == 0:
        summary = {k: v for k, v in asdict(result).items() if k != "history"}
        print("RESULT " + json.dumps({**summary, "world_size": world}))
    return 0


def _event(folder: Path, **event) -> None:
    """One JSON line, written in one call and flushed: the reader takes only complete lines."""
    with open(folder / "events.jsonl", "a", encoding="utf-8") as stream:
        stream.write(json.dumps(event) + "\n")


def _outcome(folder: Path, payload: dict) -> None:
    """outcome.json, atomically (rename): the reader sees all of it or nothing."""
    tmp = folder / "outcome.json.tmp"
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, folder / "outcome.json")


if __name__ == "__main__":
    raise SystemExit(main())
