"""Peak memory of the whole flow vs its training stage, on a base large enough to matter.

    python -m bench.flow_rss [--precision fp32 nf4] [--hidden 1024] [--layers 12] [--vocab 50257]
    python -m bench.flow_rss --scale gpt-neo-1.3b --hub --precision int8 [--set key=value ...]

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

`--scale gpt-neo-1.3b` builds the real 1.3B shape (2048 wide, 24 layers, 16 heads, window 256:
1.3B parameters, a 5.3 GB fp32 file). `--hub` publishes the base to a fake Hub on loopback
(tests/support/hf_hub_server.py) as `EleutherAI/gpt-neo-1.3B` and the flow runs with that name and an
empty HF cache: the default profile's path (pin the branch, download, load, identity), with the
real huggingface_hub client. `--set` adds overrides for the flow. Each stage's wall time is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
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


SCALES = {"gpt-neo-1.3b": {"hidden": 2048, "layers": 24, "heads": 16, "vocab": 50257, "window": 256}}
HUB_NAME = "EleutherAI/gpt-neo-1.3B"


def build_base(
    folder: Path, hidden: int, layers: int, vocab: int, cache: Path, heads: int = 16, window: int = 256
) -> Path:
    """A random GPT-Neo (the 1.3B's attention pattern) and the tiny build's byte-level BPE (4,096 tokens,
    with a pad token of its own: GPT-Neo's tokenizer has none; the flow then pads with EOS, which the
    seed-profile test covers, not this memory benchmark)."""
    from transformers import AutoTokenizer

    from lib.base_model import build_tiny_tokenizer
    from lib.config import SAMPLE_CSV
    from lib.corpus import iter_articles, join_title_and_text

    texts = [join_title_and_text(a) for a in iter_articles(SAMPLE_CSV)]
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(texts, 4096, cache))
    return save_gpt_neo(folder, tokenizer, hidden, layers, vocab, heads, window)


def save_gpt_neo(folder: Path, tokenizer, hidden: int, layers: int, vocab: int, heads: int, window: int) -> Path:
    """A GPT-Neo with random weights (seed 0) and the 1.3B's context and global/local attention pattern,
    saved with `tokenizer` (whose EOS is also its BOS) as a `from_pretrained` folder."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        attention_types=[[["global", "local"], layers // 2]],
        max_position_embeddings=2048,
        window_size=window,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPTNeoForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def child(args: argparse.Namespace) -> None:
    """Run the flow in this process, sampling RSS per stage; print one RESULT line."""
    import importlib

    import psutil

    # A local base is mapped from its folder; a hub one from the HF cache's blobs of that repo.
    weights = args.weights or str(Path(args.base) / "model.safetensors")
    process, current = psutil.Process(), ["startup"]
    peaks: dict[str, dict[str, float]] = {}
    began: dict[str, float] = {}  # stage -> when it began (monotonic s)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            label = current[0]
            rss = process.memory_info().rss / 2**20
            with open("/proc/self/maps") as maps:  # one line per mapped range of the file
                mapped = sum(weights in line for line in maps)
            if current[0] != label:  # a stage began or ended while measuring: the sample is neither's
                continue
            stage = peaks.setdefault(label, {})
            stage["peak_rss_mib"] = max(stage.get("peak_rss_mib", 0.0), rss)
            stage["max_base_mappings"] = max(stage.get("max_base_mappings", 0), mapped)
            time.sleep(0.02)

    def marked(name, fn):
        def run(*a, **k):
            current[0], began[name] = name, time.monotonic()
            try:
                return fn(*a, **k)
            finally:
                current[0] = f"after {name}"
                peaks.setdefault(name, {})["wall_s"] = round(time.monotonic() - began[name], 1)

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
        *(args.set or []),
    ]
    code = main(["run", *sum((["--set", o] for o in overrides), [])])
    stop.set()
    thread.join()
    print("RESULT " + json.dumps({"rc": code, "stages": peaks}), flush=True)


def measure(precision: str, base: Path | str, cache: Path, extra: list[str], env: dict[str, str]) -> dict:
    command = [sys.executable, "-m", "bench.flow_rss", "--child", precision, "--base", str(base)]
    command += ["--cache", str(cache / precision), *(f"--set={o}" for o in extra)]
    if "HF_HOME" in env:
        command += ["--weights", str(Path(env["HF_HOME"]) / "hub" / f"models--{HUB_NAME.replace('/', '--')}" / "blobs")]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING", **env}
    )
    if "RESULT " not in done.stdout:
        raise RuntimeError(f"{precision}: the flow failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    stages = result["stages"]
    if result["rc"] != 0 or "train" not in stages:
        raise RuntimeError(
            f"{precision}: the flow exited {result['rc']} (stages {sorted(stages)}):\n{done.stderr[-3000:]}"
        )
    flow_peak = max(s.get("peak_rss_mib", 0.0) for s in stages.values())
    train_peak = stages["train"]["peak_rss_mib"]
    return {
        "precision": precision,
        "rc": result["rc"],
        "flow_peak_mib": round(flow_peak),
        "train_peak_mib": round(train_peak),
        "flow_over_train": round(flow_peak / train_peak, 3),
        "stages": {
            k: {"peak_rss_mib": round(v["peak_rss_mib"]), "max_base_mappings": v["max_base_mappings"]}
            | ({"wall_s": v["wall_s"]} if "wall_s" in v else {})
            for k, v in stages.items()
            if "peak_rss_mib" in v
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", default=["fp32", "nf4"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--scale", choices=sorted(SCALES), help="a real model's shape (overrides the sizes)")
    parser.add_argument("--hub", action="store_true", help=f"serve the base through a fake Hub as {HUB_NAME}")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="another override for the flow")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    shape = (
        SCALES[args.scale]
        if args.scale
        else {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "window")}
    )
    with tempfile.TemporaryDirectory(prefix="flow-rss-") as tmp, contextlib.ExitStack() as stack:
        base = build_base(Path(tmp) / "base", cache=Path(tmp) / "tok", **shape)
        size = (base / "model.safetensors").stat().st_size / 2**20
        where, env = base, {}
        if args.hub:
            from tests.support.hf_hub_server import running_hf_hub

            hub = stack.enter_context(running_hf_hub(Path(tmp) / "hub"))
            hub.publish(HUB_NAME, base)
            shutil.rmtree(base)  # from here on the weights exist only on the Hub
            where, env = HUB_NAME, {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(Path(tmp) / "hf-home")}
        for precision in args.precision:
            result = measure(precision, where, Path(tmp), args.set or [], env)
            print(json.dumps({"base_mib": round(size), **shape, "hub": args.hub, **result}), flush=True)


if __name__ == "__main__":
    main()
