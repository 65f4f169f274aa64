"""The Markdown a person reads in Prefect's UI (the runs' summary artifacts): where the MLflow run
is, base vs tuned metrics, the champion decision, a few samples."""

from __future__ import annotations

from lib.evaluation import metrics_markdown, samples_markdown
from lib.tracking import run_link


def render_summary(summary: dict) -> str:
    """The run's Markdown artifact: where the run is, base vs tuned metrics, a few samples.

    Also renders re-evaluations (`render_evaluation`), which pass a `title` and `champion: None`.
    """
    model, link = summary["model"], run_link(summary["tracking_uri"], summary["run_id"])
    where = (f"[{link['url']}]({link['url']})" if not link["command"] else
             f"`{link['command']}`, then open {link['url']}")
    champion = "" if model.get("champion") is None else f" (champion: {'yes' if model['champion'] else 'no'})"
    parts = [f"## lenta-lora: {summary.get('title') or model['uri']}",
             f"**MLflow run** `{summary['run_id']}`: {where}\n\n**Model** `{model['uri']}`{champion}",
             "### Test metrics: base vs tuned, same test articles", metrics_markdown(summary["metrics"])]
    decision, benchmark = model.get("decision"), summary.get("benchmark")
    if decision and benchmark:
        parts.append(f"### Champion\n\n{decision['reason']} ({decision['metric']} on benchmark "
                     f"`{benchmark['fingerprint'][:12]}`: {benchmark['texts']} texts, {benchmark['source']}; "
                     f"min_improvement {decision['min_improvement']:g})")
    if summary.get("bleu_signature"):
        parts.append(f"BLEU: sacreBLEU `{summary['bleu_signature']}`; chrF++ and BLEU on 0-100, the others 0-1.")
    samples = summary.get("samples")
    if samples:
        parts += [f"### Samples (first {len(samples)}; all in the run's `samples/samples.md`)", samples_markdown(samples)]
    return "\n\n".join(part.strip() for part in parts) + "\n"


def render_evaluation(summary: dict) -> str:
    target = summary["evaluated"]
    return render_summary({**summary, "model": {**target, "champion": None},
                           "title": f"re-evaluation of {target['uri']} (trained in run `{target['run_id']}`) "
                                    f"on `{summary['csv']}`"})
