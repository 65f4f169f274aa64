"""Peak memory of the whole flow vs its training stage, on a base large enough to matter.

    python -m bench.flow_rss [--precision fp32 nf4] [--hidden 1024] [--layers 12] [--vocab 50257]

Builds a GPT-Neo with random weights from a config (no download; 1024 x 12 layers with GPT-2's
vocabulary is ~205M parameters, an 0.8 GB fp32 `model.safetensors`) as a local base folder, then
runs the real `finetune` flow on it (`lenta-lora run`, demo profile, a few steps, sqlite store), one
fresh child process per precision. In the child a thread samples the process RSS every 20 ms and
counts how many times the base's `model.safetensors` is mapped (/proc/self/maps). Each sample is
attributed to the stage running at that moment: the child wraps the lib functions the tasks call
(prepare_dataset, train_adapter, evaluate_adapter, register_adapter) to mark stage boundaries;
nothing else changes. The flow is measured, not a re-creation of it.

Prints one JSON line per precision: the peak RSS of each stage (MiB), the largest number of mappings
of the base file in each stage, and `flow_peak / train_peak`. The target (issue #17) is <= 1.3: the
stages after training must not hold a second copy of the base.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "lib.dataset": "prepare_dataset",
    "lib.training": "train_adapter",
    "lib.evaluation": "evaluate_adapter",
    "lib.registry": "register_adapter",
}


def build_base(folder: Path, hidden: int, layers: int, vocab: int, cache: Path) -> Path:
    """A random GPT-Neo (the 1.3B's attention pattern) and a byte-level BPE without a pad token."""
    import torch
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    from lib.base_model import build_tiny_tokenizer
    from lib.config import SAMPLE_CSV
    from lib.corpus import iter_articles, join_title_and_text

    texts = [join_title_and_text(a) for a in iter_articles(SAMPLE_CSV)]
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(texts, 4096, cache))
    config = GPTNeoConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=16,
        attention_types=[[["global", "local"], layers // 2]],
        max_position_embeddings=2048,
        window_size=256,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPTNeoForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def child(args: argparse.Namespace) -> None:
    """Run the flow in this process, sampling RSS per stage; print one RESULT line."""
    import importlib

    import psutil

    weights = str(Path(args.base) / "model.safetensors")
    process, current = psutil.Process(), ["startup"]
    peaks: dict[str, dict[str, float]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = process.memory_info().rss / 2**20
            with open("/proc/self/maps") as maps:  # one line per mapped range of the file
                mapped = sum(weights in line for line in maps)
            stage = peaks.setdefault(current[0], {"peak_rss_mib": 0.0, "max_base_mappings": 0})
            stage["peak_rss_mib"] = max(stage["peak_rss_mib"], rss)
            stage["max_base_mappings"] = max(stage["max_base_mappings"], mapped)
            time.sleep(0.02)

    def marked(name, fn):
        def run(*a, **k):
            current[0] = name
            try:
                return fn(*a, **k)
            finally:
                current[0] = f"after {name}"

        return run

    for module, name in STAGES.items():
        mod = importlib.import_module(module)
        setattr(mod, name, marked(name.split("_")[0], getattr(mod, name)))
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    from flows.cli import main

    overrides = [
        f"model.name={args.base}",
        f"model.precision={args.child}",
        f"data.cache_dir={args.cache}",
        f"tracking.uri=sqlite:///{args.cache}/mlflow.db",
        "train.max_steps=3",
        "train.batch_size=2",
        "train.max_length=128",
        "train.eval_every=1000",
        "eval.num_samples=2",
        "eval.max_new_tokens=8",
        "lora.target_modules=[q_proj,v_proj]",
        f"registry.model_name=rss-{args.child}",
    ]
    code = main(["run", *sum((["--set", o] for o in overrides), [])])
    stop.set()
    thread.join()
    print("RESULT " + json.dumps({"rc": code, "stages": peaks}), flush=True)


def measure(precision: str, base: Path, cache: Path) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.flow_rss",
            "--child",
            precision,
            "--base",
            str(base),
            "--cache",
            str(cache / precision),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"},
    )
    if "RESULT " not in done.stdout:
        raise RuntimeError(f"{precision}: the flow failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    stages = result["stages"]
    if result["rc"] != 0 or "train" not in stages:
        raise RuntimeError(
            f"{precision}: the flow exited {result['rc']} (stages {sorted(stages)}):\n{done.stderr[-3000:]}"
        )
    flow_peak = max(s["peak_rss_mib"] for s in stages.values())
    train_peak = stages["train"]["peak_rss_mib"]
    return {
        "precision": precision,
        "rc": result["rc"],
        "flow_peak_mib": round(flow_peak),
        "train_peak_mib": round(train_peak),
        "flow_over_train": round(flow_peak / train_peak, 3),
        "stages": {
            k: {"peak_rss_mib": round(v["peak_rss_mib"]), "max_base_mappings": v["max_base_mappings"]}
            for k, v in stages.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", default=["fp32", "nf4"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="flow-rss-") as tmp:
        base = build_base(Path(tmp) / "base", args.hidden, args.layers, args.vocab, Path(tmp) / "tok")
        size = (base / "model.safetensors").stat().st_size / 2**20
        for precision in args.precision:
            print(
                json.dumps(
                    {
                        "base_mib": round(size),
                        "hidden": args.hidden,
                        "layers": args.layers,
                        **measure(precision, base, Path(tmp)),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
