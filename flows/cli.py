"""`lenta-lora`: run the flow, list registered adapters, generate with one.

lenta-lora run [--config PATH] [--set key=value ...]
lenta-lora models [--model NAME]
lenta-lora promote --model NAME --version N [--force]
lenta-lora generate --model NAME (--version N | --alias champion) "Заголовок новости"
lenta-lora evaluate --model NAME (--version N | --alias A) [--csv PATH] [--config PATH] [--set key=value ...]
lenta-lora export --model NAME (--version N | --alias A) --out DIR [--merged] [--dtype bf16|fp16|fp32]
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from flows import errors

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = PROJECT_ROOT / "configs" / "demo.yaml"


def _quiet_environment() -> None:
    """Defaults that keep a CLI run's output readable; a user's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # telemetry traceback offline
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lenta_lora")  # lib logs in Prefect's run logs
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # bounded wait on a dead server
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small downloads: bars are noise
    # Before torch loads (OpenMP reads it once): idle OpenMP threads sleep instead of spinning on a
    # core a neighbour needs; the thread count is chosen where work starts (lib/threads.py).
    from lib.threads import set_wait_policy

    set_wait_policy()


def command_run(args) -> int:
    from lib.config import load_config
    from lib.reports import summary_text

    config = load_config(args.config, args.set or [])  # every config problem reported before any work
    from flows.finetune import finetune

    summary = finetune(config=config, force=args.force)
    print(summary_text(summary))
    return 0


def command_models(args) -> int:
    from lib.registry import list_versions
    from lib.store import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    rows = list_versions(uri, args.model)
    if not rows:
        print(f"no registered adapters in {uri}")
        return 0
    print(
        f"{'model':<24} {'ver':>4}  {'aliases':<12} {'benchmark_bits_per_byte':>23}  {'measured on':<12} "
        f"{'test_bits_per_byte':>18}  run"
    )
    for r in rows:
        t, bench = r["tags"], r["benchmark"] or ""
        value, on = t.get("benchmark_bits_per_byte"), t.get("benchmark_fingerprint", "")
        shown = f"{float(value):.6g}" if value else "-"
        where = "-" if not on else on[:12] if on == bench else f"{on[:8]} (other)"
        print(
            f"{r['name']:<24} {r['version']:>4}  {','.join(r['aliases']) or '-':<12} {shown:>23}  {where:<12} "
            f"{t.get('test_bits_per_byte', '-'):>18}  {r['run_id']}"
        )
    benchmarks = {r["name"]: r for r in rows if r["benchmark"]}
    for name, r in sorted(benchmarks.items()):
        print(f"{name}: benchmark {r['benchmark'][:12]} = {r['benchmark_source']}")
    return 0


def _score_unscored(uri: str, name: str, version: int, metric: str) -> None:
    """Score the version to promote and the holder on the model's benchmark where they lack it
    (registered before benchmarks existed), recording the scores on the versions."""
    import tempfile

    from lib import champion
    from lib.benchmark_store import fetch_benchmark
    from lib.config import EvalConfig
    from lib.loading import resolve_version
    from lib.reevaluation import score_registered_on_benchmark
    from lib.store import client as _client

    with tempfile.TemporaryDirectory(prefix="lenta-lora-benchmark-") as tmp:
        benchmark = fetch_benchmark(uri, name, tmp)
        if benchmark is None:
            return
        client = _client(uri)
        holder = champion.unscored_holder(uri, name, benchmark.fingerprint, metric)
        target = resolve_version(client, uri, f"models:/{name}/{version}")  # LookupError naming what exists
        todo = {str(version)} if champion.score_of(target, metric, benchmark.fingerprint) is None else set()
        for number in sorted(todo | ({holder} if holder else set())):
            print(f"scoring version {number} on benchmark {benchmark.fingerprint[:12]} ({benchmark.texts} texts)...")
            try:
                batch = EvalConfig().batch_size  # no run config here: the default scoring batch
                scores = score_registered_on_benchmark(uri, f"models:/{name}/{number}", benchmark, batch)
            except Exception as error:  # noqa: BLE001 - reported; the gate then says it has no score
                print(f"could not score version {number}: {str(error).splitlines()[0][:200]}")
                continue
            champion.record_scores(uri, name, number, benchmark, scores, reason="scored by lenta-lora promote")


def command_promote(args) -> int:
    from lib.champion import promote
    from lib.store import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    _score_unscored(uri, args.model, args.version, args.metric)
    report = promote(uri, args.model, args.version, args.metric, args.min_improvement, args.force)
    value = "-" if report["value"] is None else f"{report['value']:.6g}"
    held = "-" if report["holder_value"] is None else f"{report['holder_value']:.6g}"
    print(f"benchmark:         {report['benchmark_fingerprint'][:12]} ({report['metric']}, lower is better)")
    print(f"version {report['version']}:         {value}")
    print(f"champion (v{report['holder'] or '-'}):     {held}")
    if report.get("threshold") is not None:
        print(
            f"gate:              needs < {report['threshold']:.6g} (holder x (1 - {report['min_improvement']:g})); "
            f"relative improvement {report['relative_improvement']:+.4%}"
        )
    if report["promoted"]:
        print(
            f"champion:          now version {report['version']}"
            + (" (forced past the gate)" if report["forced"] else "")
        )
        return 0
    print(
        f"champion:          stays {report['champion_version']}"
        + ("" if report["holder"] == report["version"] else " (use --force to promote anyway)")
    )
    return 0 if report["holder"] == report["version"] else 1


def command_generate(args) -> int:

    from lib.generation import generate_continuations
    from lib.loading import load_registered, model_uri
    from lib.store import resolve_tracking_uri
    from lib.threads import configure_threads

    configure_threads()  # OMP_NUM_THREADS wins, else chosen for this machine (lib/threads.py)

    # A prompt that is not valid UTF-8 reaches Python as lone surrogates (PEP 383), which the
    # tokenizer cannot encode: replace the bad bytes instead of crashing.
    args.prompt = [p.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for p in args.prompt]
    uri = resolve_tracking_uri(args.tracking_uri)
    model, tokenizer, base = load_registered(uri, model_uri(args.model, args.version, args.alias))
    # The same function and defaults as the version's pyfunc and the evaluation samples; greedy unless
    # --temperature (the pyfunc's default is the profile's `eval`, which may sample).
    max_new = args.max_new_tokens or int(base.get("generation", {}).get("max_new_tokens", 64))
    outputs = generate_continuations(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=max_new,
        do_sample=args.temperature is not None,
        temperature=args.temperature or 1.0,
        top_p=args.top_p,
        seed=args.seed,
    )
    for prompt, text in zip(args.prompt, outputs):
        print(f"{prompt}\n{text}\n" if len(args.prompt) > 1 else f"{prompt} {text}")
    return 0


def command_evaluate(args) -> int:
    from lib.loading import model_uri, registered_version
    from lib.reevaluation import evaluation_config
    from lib.reports import run_link
    from lib.store import resolve_tracking_uri

    if args.csv and not Path(args.csv).expanduser().is_file():
        raise FileNotFoundError(
            f"--csv {args.csv}: no such file; pass a Kaggle-format CSV (url,title,text,topic,tags,date)"
        )
    uri = resolve_tracking_uri(args.tracking_uri)
    # Unknown model/version/alias and every config problem are reported here, before any work.
    target = registered_version(uri, model_uri(args.model, args.version, args.alias))
    config = evaluation_config(target["config_yaml"], args.config, args.set or [], args.csv, uri)
    from flows.evaluate import evaluate_registered

    summary = evaluate_registered(target["name"], version=target["version"], config=config)
    m, link = summary["metrics"], run_link(uri, summary["run_id"])
    print("\n=== lenta-lora: evaluation complete ===")
    print(f"evaluated:         {target['uri']} (trained in run {target['run_id']})")
    print(
        f"data:              test split of {summary['csv']} "
        f"(same data as training: {'yes' if summary['same_data_as_training'] else 'NO'})"
    )
    print(f"MLflow run:        {summary['run_id']} (tag last_evaluation_run_id set on {target['uri']})")
    print(f"test perplexity:   base {m['base_test_perplexity']:.2f} -> tuned {m['test_perplexity']:.2f}")
    print(f"test bits/byte:    base {m['base_test_bits_per_byte']:.4f} -> tuned {m['test_bits_per_byte']:.4f}")
    if "chrf" in m:
        print(f"chrF++:            base {m['base_chrf']:.2f} -> tuned {m['chrf']:.2f}")
    print(f"browse it:         {link['command'] + ', then open ' if link['command'] else ''}{link['url']}")
    return 0


def command_export(args) -> int:
    from lib.export import export_version
    from lib.loading import model_uri
    from lib.store import resolve_tracking_uri
    from lib.threads import configure_threads

    configure_threads()  # the merge multiplies every LoRA pair
    done = export_version(
        resolve_tracking_uri(args.tracking_uri),
        model_uri(args.model, args.version, args.alias),
        args.out,
        args.merged,
        args.dtype,
    )
    form = f"merged into its base, {done['dtype']}" if done["mode"] == "merged" else "LoRA adapter"
    print(
        f"exported {done['uri']} ({form}) to {done['out']}: {len(done['files'])} files, "
        f"{sum(done['files'].values()) / 1e6:.1f} MB; see README.md there"
    )
    return 0


def add_version_choice(parser: argparse.ArgumentParser) -> None:
    """`--model NAME` plus exactly one of `--version N` / `--alias A`."""
    parser.add_argument("--model", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int)
    which.add_argument("--alias")


def build_parser() -> argparse.ArgumentParser:
    from lib.config import RegistryConfig

    parser = argparse.ArgumentParser(
        prog="lenta-lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--debug", action="store_true", help="show tracebacks of errors too")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fine-tune, evaluate and register an adapter")
    run.add_argument("--config", default=str(DEFAULT_PROFILE), help="YAML profile (default: configs/demo.yaml)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.max_steps=20")
    run.add_argument("--force", action="store_true", help="train even if a registered version holds this training key")
    run.set_defaults(func=command_run)
    models = sub.add_parser("models", help="list registered adapter versions")
    models.add_argument("--model", help="registered model name (default: all)")
    models.set_defaults(func=command_models)
    gen = sub.add_parser("generate", help="continue a headline with a registered adapter")
    add_version_choice(gen)
    gen.add_argument("prompt", nargs="+")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the version's (its profile's eval)")
    gen.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus when sampling (default 1: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=command_generate)
    ev = sub.add_parser("evaluate", help="re-evaluate a registered adapter (base vs tuned) in a new MLflow run")
    add_version_choice(ev)
    ev.add_argument("--csv", help="Kaggle-format CSV whose test split to use (default: the bundled sample)")
    ev.add_argument("--config", help="YAML profile (default: the config the version was trained with)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. eval.num_samples=20")
    ev.set_defaults(func=command_evaluate)
    promo = sub.add_parser("promote", help="move `champion` to a version (gated on the model's benchmark)")
    promo.add_argument("--model", required=True)
    promo.add_argument("--version", type=int, required=True)
    promo.add_argument("--force", action="store_true", help="promote even if it does not pass the gate")
    promo.add_argument(
        "--min-improvement",
        type=float,
        default=RegistryConfig().min_improvement,
        help="relative margin over the holder (default: %(default)s)",
    )
    promo.add_argument("--metric", default=RegistryConfig().champion_metric)
    promo.set_defaults(func=command_promote)
    exp = sub.add_parser("export", help="write a version as a PEFT adapter folder, or merged into its base")
    add_version_choice(exp)
    exp.add_argument("--out", required=True, help="folder to create (refused if it holds anything)")
    exp.add_argument("--merged", action="store_true", help="base + adapter in one model: transformers loads it alone")
    exp.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        help="merged weights (default: the version's precision; fp32 for an int8/nf4 version)",
    )
    exp.set_defaults(func=command_export)
    for p in (models, gen, ev, promo, exp):
        p.add_argument(
            "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_environment()
    # Progress lines for the long commands; `generate`, `models`, `promote` print their answer alone.
    level = logging.INFO if args.command in ("run", "evaluate", "export") or args.debug else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "bitsandbytes"):  # per-request lines; an optional-kernel notice on CPU
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    user_errors = errors.user_errors()
    if not args.debug:
        errors.hide_user_error_tracebacks(user_errors)
    try:
        return args.func(args)
    except user_errors as error:
        if args.debug:
            traceback.print_exc()
        print(f"lenta-lora: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(
            f"lenta-lora: error: no space left on the disk holding {error.filename or 'a file being written'}: "
            "free disk space (or move data.cache_dir / the MLflow store), then run again",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
