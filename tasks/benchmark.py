"""The registered model's benchmark: find it (or define it, for a model's first version) before
evaluation, store it when the first version is registered, and score a champion that predates it.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from lib import benchmark_store, champion, reevaluation, tracking
from lib.benchmark import Benchmark, write_benchmark
from lib.config import PipelineConfig
from lib.dataset import PreparedDataset, load_prepared


def _define_benchmark(config: PipelineConfig, prepared: PreparedDataset, folder: Path) -> Benchmark:
    """The texts `registry.benchmark` names: this run's test split, or a CSV's / the Kaggle file's."""
    where = config.registry.benchmark
    if where is None:
        documents = list(load_prepared(prepared.path)["test"]["document"])
        source = f"test split of {Path(prepared.csv).name} (dataset {prepared.fingerprint[:12]})"
    else:
        if where == "kaggle":
            from lib.kaggle_source import download_kaggle_file

            data = config.data
            csv = str(download_kaggle_file(data.kaggle_dataset, data.kaggle_file, f"{data.cache_dir}/kaggle"))
            source = f"test split of Kaggle {data.kaggle_dataset}/{data.kaggle_file}"
        else:
            csv = str(Path(where).expanduser().resolve())
            if not Path(csv).is_file():
                raise FileNotFoundError(
                    f"registry.benchmark {where}: no such file; give a Kaggle-format CSV, "
                    "'kaggle', or leave it unset (the first version's test split)"
                )
            source = f"test split of {csv}"
        documents = reevaluation.test_split(csv, config.data)["document"]
    return write_benchmark(documents, config.train.max_length, config.eval.stride, source, folder)


@task(retries=2, retry_delay_seconds=[2, 10])
def resolve_benchmark(config: PipelineConfig, prepared: PreparedDataset, uri: str) -> Benchmark:
    """The model's stored benchmark, downloaded (once: `data.cache_dir/benchmarks/<fingerprint>.json`);
    for a model with none yet, the one this run would fix (`stored` False: registration stores it
    with the first version)."""
    logger = get_run_logger()
    folder = Path(config.data.cache_dir) / "benchmarks"
    stored = benchmark_store.fetch_benchmark(uri, config.registry.model_name, folder)
    if stored is not None:
        if config.registry.benchmark is not None:
            logger.warning(
                "registry.benchmark=%s is ignored: %s is judged on its stored benchmark %s (%s)",
                config.registry.benchmark,
                config.registry.model_name,
                stored.fingerprint[:12],
                stored.source,
            )
        logger.info(
            "benchmark of %s: %s (%d texts, %s)",
            config.registry.model_name,
            stored.fingerprint[:12],
            stored.texts,
            stored.source,
        )
        return stored
    defined = _define_benchmark(config, prepared, folder)
    logger.info(
        "%s has no benchmark yet: its first version fixes %s (%d texts, %s)",
        config.registry.model_name,
        defined.fingerprint[:12],
        defined.texts,
        defined.source,
    )
    return defined


@task(retries=2, retry_delay_seconds=[2, 10])
def store_benchmark(benchmark: Benchmark, config: PipelineConfig, uri: str, run_id: str) -> Benchmark:
    """Fix the benchmark on the registered model (a no-op when it is stored already) and log it as
    this run's `benchmark` dataset input. Returns the model's benchmark afterwards."""
    name = config.registry.model_name
    kept = benchmark
    if not benchmark.stored:
        kept = benchmark_store.store_benchmark(uri, name, benchmark, config.tracking.experiment)
    if kept.fingerprint != benchmark.fingerprint:  # a concurrent first registration finished first
        get_run_logger().warning(
            "%s got benchmark %s from a concurrent run; this run was scored on %s, so its "
            "version stays out of the champion race",
            name,
            kept.fingerprint[:12],
            benchmark.fingerprint[:12],
        )
    benchmark_store.log_documents(uri, run_id, benchmark, name, context="benchmark")
    tracking.set_tags(
        uri, run_id, {"benchmark_fingerprint": benchmark.fingerprint, "benchmark_source": benchmark.source}
    )
    return kept


@task
def score_champion_on_benchmark(config: PipelineConfig, benchmark: Benchmark, uri: str) -> str | None:
    """A champion registered before this benchmark existed has no score on it: score it now (and
    record the score on that version), so the challenger is compared on the same texts. If it
    cannot be scored (its base is gone, say), it is left out of the race, with a log line."""
    name, metric = config.registry.model_name, config.registry.champion_metric
    holder = champion.unscored_holder(uri, name, benchmark.fingerprint, metric)
    if holder is None:
        return None
    logger = get_run_logger()
    logger.info(
        "champion %s/%s has no %s on benchmark %s: scoring it now", name, holder, metric, benchmark.fingerprint[:12]
    )
    try:
        scores = reevaluation.score_registered_on_benchmark(
            uri, f"models:/{name}/{holder}", benchmark, config.eval.batch_size
        )
    except Exception as error:  # noqa: BLE001 - the decision goes on without it, and says so
        logger.warning(
            "could not score champion %s/%s on the benchmark (%s): it is left out of the race",
            name,
            holder,
            str(error).splitlines()[0][:200],
        )
        return None
    champion.record_scores(uri, name, holder, benchmark, scores, reason="scored when first compared")
    logger.info("champion %s/%s: %s %.6g on the benchmark", name, holder, metric, scores[metric])
    return holder
