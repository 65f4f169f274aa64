"""What a person reads and follows: the Markdown of Prefect's summary artifacts (where the MLflow
run is, base vs tuned metrics, the champion decision, a few samples), the same summary as the
`lenta-lora run` command prints it, and links to MLflow runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lib import store
from lib.evaluation import EvaluationSummary, metrics_markdown, samples_markdown

if TYPE_CHECKING:  # only for the annotations: the flow hands these over
    from lib.benchmark import Benchmark
    from lib.dataset import PreparedDataset
    from lib.train_result import TrainResult

log = logging.getLogger("lenta_lora.reports")


def run_summary(
    run_id: str,
    uri: str,
    key: str,
    prepared: PreparedDataset,
    trained: TrainResult,
    evaluated: EvaluationSummary,
    benchmark: Benchmark,
    registered: dict,
) -> dict:
    """What a `finetune` run returns (and `render_summary` shows): the run, the version, the
    metrics, the training facts and the first samples. Only JSON types, so Prefect can store it."""
    return {
        "run_id": run_id,
        "tracking_uri": uri,
        "model": registered,
        "metrics": evaluated.metrics,
        "train": trained.summary(),
        "dataset_fingerprint": prepared.fingerprint,
        "training_key": key,
        "benchmark": benchmark.describe(),
        "up_to_date": registered["up_to_date"],
        "samples": evaluated.samples,
        "bleu_signature": evaluated.bleu_signature,
    }


def up_to_date_summary(run_id: str, uri: str, key: str, prepared: PreparedDataset, holder: dict, message: str) -> dict:
    """What a `finetune` run returns when a registered version already holds its training key."""
    return {
        "run_id": run_id,
        "tracking_uri": uri,
        "up_to_date": True,
        "model": holder,
        "message": message,
        "training_key": key,
        "dataset_fingerprint": prepared.fingerprint,
    }


def render_summary(summary: dict) -> str:
    """The run's Markdown artifact: where the run is, base vs tuned metrics, a few samples.

    Also renders re-evaluations (`render_evaluation`), which pass a `title` and `champion: None`.
    """
    model, link = summary["model"], run_link(summary["tracking_uri"], summary["run_id"])
    where = (
        f"[{link['url']}]({link['url']})" if not link["command"] else f"`{link['command']}`, then open {link['url']}"
    )
    champion = "" if model.get("champion") is None else f" (champion: {'yes' if model['champion'] else 'no'})"
    parts = [
        f"## lenta-lora: {summary.get('title') or model['uri']}",
        f"**MLflow run** `{summary['run_id']}`: {where}\n\n**Model** `{model['uri']}`{champion}",
        "### Test metrics: base vs tuned, same test articles",
        metrics_markdown(summary["metrics"]),
    ]
    decision, benchmark = model.get("decision"), summary.get("benchmark")
    if decision and benchmark:
        parts.append(
            f"### Champion\n\n{decision['reason']} ({decision['metric']} on benchmark "
            f"`{benchmark['fingerprint'][:12]}`: {benchmark['texts']} texts, {benchmark['source']}; "
            f"min_improvement {decision['min_improvement']:g})"
        )
    if summary.get("bleu_signature"):
        parts.append(f"BLEU: sacreBLEU `{summary['bleu_signature']}`; chrF++ and BLEU on 0-100, the others 0-1.")
    samples = summary.get("samples")
    if samples:
        parts += [
            f"### Samples (first {len(samples)}; all in the run's `samples/samples.md`)",
            samples_markdown(samples),
        ]
    return "\n\n".join(part.strip() for part in parts) + "\n"


def render_evaluation(summary: dict) -> str:
    target = summary["evaluated"]
    return render_summary(
        {
            **summary,
            "model": {**target, "champion": None},
            "title": f"re-evaluation of {target['uri']} (trained in run `{target['run_id']}`) on `{summary['csv']}`",
        }
    )


def browse_hint(uri: str) -> str:
    """How a person opens the store in the MLflow UI: a server's own address, else `mlflow ui`."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def summary_text(summary: dict) -> str:
    """The run summary (`run_summary` / `up_to_date_summary`) as `lenta-lora run` prints it."""
    out: list[str] = []
    model, uri = summary["model"], summary["tracking_uri"]
    if summary.get("up_to_date") and "metrics" not in summary:
        out.append("\n=== lenta-lora: up to date ===")
        out.append(f"MLflow run:        {summary['run_id']}")
        out.append(summary["message"])
        out.append(f"browse it:         {browse_hint(uri)}")
        return "\n".join(out)
    m = summary["metrics"]
    out.append("\n=== lenta-lora: run complete ===")
    out.append(f"MLflow run:        {summary['run_id']}")
    if model.get("up_to_date"):
        out.append(
            f"registered model:  nothing registered: {model['uri']} holds the same training key (a concurrent run)"
        )
    else:
        out.append(
            f"registered model:  {model['name']} version {model['version']}  ({model['uri']}; "
            f"champion: {'yes' if model['champion'] else 'no'})"
        )
        out.append(f"champion:          {model['decision']['reason']}")
    if "benchmark_bits_per_byte" in m:
        bench = summary["benchmark"]
        out.append(
            f"benchmark bits/b:  {m['benchmark_bits_per_byte']:.4f}  (benchmark {bench['fingerprint'][:12]}: "
            f"{bench['texts']} texts, {bench['source']})"
        )
    out.append(f"test perplexity:   base {m['base_test_perplexity']:.2f} -> tuned {m['test_perplexity']:.2f}")
    out.append(f"test bits/byte:    base {m['base_test_bits_per_byte']:.4f} -> tuned {m['test_bits_per_byte']:.4f}")
    if "chrf" in m:
        out.append(f"chrF++:            base {m['base_chrf']:.2f} -> tuned {m['chrf']:.2f}")
    out.append(
        f"trained:           {summary['train']['steps']} steps, {summary['train']['tokens']} tokens, "
        f"{summary['train']['seconds']:.0f}s"
    )
    out.append(f"browse it:         {browse_hint(uri)}")
    return "\n".join(out)


def run_link(uri: str, run_id: str) -> dict:
    """Where a person finds a run: `url` for an MLflow server, else `command` to start the UI.

    `url` is `<uri>/#/experiments/<exp>/runs/<run>` for http(s) stores; for a database or file
    store, `command` is the `mlflow ui` line and `url` the page it will serve. A store that cannot
    be reached still gets a usable link: the UI's `#/runs/<run>` route redirects to the run.
    """
    base = uri.rstrip("/")
    served = base if base.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    try:
        store.require_reachable(uri)  # a down server: one 5 s probe instead of MLflow's minutes of retries
        experiment = store.client(uri).get_run(run_id).info.experiment_id
        url = f"{served}/#/experiments/{experiment}/runs/{run_id}"
    except Exception as error:  # a dead server must not fail a flow whose work is already logged
        log.warning("could not look up run %s in %s: %s", run_id, uri, error)
        experiment, url = None, f"{served}/#/runs/{run_id}"
    command = None if base.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
    return {"url": url, "command": command, "experiment_id": experiment, "run_id": run_id}
