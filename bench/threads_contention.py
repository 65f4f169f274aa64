"""Training throughput on a quiet machine vs beside CPU hogs, torch's default threads vs lib.threads.

    python -m bench.threads_contention [--steps 30] [--repeats 1] [--settings old new] [--set key=value ...]

For each setting, the same `--steps` optimizer steps of the demo profile's training
(lib.training.train_model on the prepared bundled sample) run in a fresh process, twice: on the
machine as it is ("quiet"), and beside one busy-loop process per usable CPU that this bench starts
before and kills after ("hogs"). A fresh process per measurement, because the OpenMP wait policy is
read once, when torch loads. Settings:
  old          torch's defaults: one thread per CPU, OpenMP's default wait policy (OMP_* unset);
  new          lib.threads: OMP_WAIT_POLICY=PASSIVE in the environment, threads from `train.threads: auto`;
  t1, t2, t2-passive   fixed thread counts (and wait policy), to see where the difference comes from.
Prints one JSON line: tokens/s quiet and beside hogs per setting, `slowdown` = quiet / hogs
(1 = unaffected, 2 = a fair share of 2 cores among 4 busy processes), and the load average
(1 min) before each measurement. The hogs are always stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOG = "while True: pass"
# environment of each setting: None removes the variable (a user's shell may have set it)
SETTINGS = {
    "old": {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None, "LENTA_LORA_THREADS": None},
    "new": {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": "PASSIVE", "LENTA_LORA_THREADS": None},
    "t1": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": None},
    "t2": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": None},
    "t2-passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
}


def child(steps: int, setting: str, overrides: list[str]) -> dict:
    """One measurement in this (fresh) process: train `steps` steps, return tokens/s."""
    import torch

    from flows.cli import DEFAULT_PROFILE
    from lib import threads, training
    from lib.config import load_config
    from lib.dataset import corpus_path, prepare_dataset

    # torch's own default, read before anything sets it; `old` pins it (lib.training applies
    # `train.threads` itself, so the old behaviour needs the number spelled out).
    pinned = [f"train.threads={torch.get_num_threads()}"] if setting == "old" else []
    config = load_config(DEFAULT_PROFILE, [f"train.max_steps={steps}", "train.eval_every=null", *overrides, *pinned])
    threads.configure_threads(config.train.threads)
    info = prepare_dataset(
        corpus_path(config.data),
        config.data,
        config.model,
        config.train.max_length,
        f"{config.data.cache_dir}/datasets",
    )
    _, _, result = training.train_model(info.path, config)
    return {
        "tokens_per_second": result.tokens / result.seconds,
        "seconds": result.seconds,
        "torch_threads": torch.get_num_threads(),
        "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def measure(setting: str, steps: int, overrides: list[str], hogs: int) -> dict:
    env = dict(os.environ)
    for key, value in SETTINGS[setting].items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        if hogs:
            time.sleep(1.0)  # let the scheduler spread them over the cores
        load = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "bench.threads_contention", "--child", setting, "--steps", str(steps)]
        cmd += [arg for o in overrides for arg in ("--set", o)]
        out = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1800)
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
    if out.returncode:
        raise RuntimeError(f"{setting} (hogs={hogs}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "loadavg_1min_before": load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per setting and condition (median)")
    parser.add_argument("--settings", nargs="+", default=["old", "new"], choices=sorted(SETTINGS))
    parser.add_argument("--hogs", type=int, default=None, help="busy-loop processes (default: one per usable CPU)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(PROJECT_ROOT)  # the demo profile's cache_dir is relative to the project
    if args.child:
        print(json.dumps(child(args.steps, args.child, args.overrides)))
        return 0
    from lib.threads import usable_cpus

    hogs = usable_cpus() if args.hogs is None else args.hogs
    child_env_prep = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.threads_contention",
            "--child",
            "t1",
            "--steps",
            "1",
            *[a for o in args.overrides for a in ("--set", o)],
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )  # build base + dataset first
    if child_env_prep.returncode:
        print(child_env_prep.stderr[-3000:], file=sys.stderr)
        return 1
    report: dict = {"steps": args.steps, "usable_cpus": usable_cpus(), "hogs": hogs, "loadavg_start": os.getloadavg()}
    for setting in args.settings:
        runs = {"quiet": [], "hogs": []}
        for _ in range(args.repeats):  # interleaved, so a neighbour's burst hits both conditions alike
            runs["quiet"].append(measure(setting, args.steps, args.overrides, 0))
            runs["hogs"].append(measure(setting, args.steps, args.overrides, hogs))
        rate = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in runs.items()}
        report[setting] = {
            "tokens_per_second_quiet": rate["quiet"],
            "tokens_per_second_hogs": rate["hogs"],
            "slowdown": rate["quiet"] / rate["hogs"],
            "torch_threads": runs["quiet"][0]["torch_threads"],
            "wait_policy": runs["quiet"][0]["wait_policy"],
            "loadavg_1min_before": [r["loadavg_1min_before"] for v in runs.values() for r in v],
        }
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
