"""The one typed config tree of a fine-tuning run.

Layering (as in PEFT's method-comparison experiments): pydantic defaults <- a YAML profile in
`configs/` <- dotted `--set key=value` overrides. Every model forbids unknown keys, so a typo is an
error, and validation collects every problem before any work starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TINY_MODEL = "tiny"  # `model.name` value that builds the small offline GPT-Neo instead of loading one
SAMPLE_CSV = Path(__file__).resolve().parent.parent / "data" / "sample" / "lenta-sample.csv"


class ConfigError(ValueError):
    """A profile or override is invalid; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitRatios(_Strict):
    train: float = Field(0.9, ge=0, le=1)
    validation: float = Field(0.05, ge=0, le=1)
    test: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {total:g}")
        return self


class DataConfig(_Strict):
    source: Literal["sample", "csv", "kaggle"] = "sample"
    path: str | None = None  # CSV path when source == "csv"
    kaggle_dataset: str = "yutkin/corpus-of-russian-news-articles-from-lenta"
    kaggle_file: str = "lenta-ru-news.csv"
    kaggle_secret_block: str | None = None  # name of a Prefect Secret block holding kaggle.json
    max_articles: int | None = Field(None, gt=0)
    seed: int = 42
    min_text_chars: int = Field(1, ge=1)
    topics: list[str] = Field(default_factory=list)
    date_from: str | None = None  # "YYYY-MM-DD"
    date_to: str | None = None
    splits: SplitRatios = Field(default_factory=SplitRatios)
    packing: bool = True  # concatenate articles and cut blocks; False = seed recipe (pad/truncate)
    cache_dir: str = ".cache/lenta-lora"
    num_proc: int = Field(2, ge=1)  # tokenization processes (used for corpora of 1,000+ articles each)

    @model_validator(mode="after")
    def _csv_needs_path(self) -> DataConfig:
        if self.source == "csv" and not self.path:
            raise ValueError("data.source is 'csv' but data.path is not set")
        return self


class TinyModelConfig(_Strict):
    """The offline base: a small GPT-Neo (same class as the real one) with a BPE trained locally."""

    vocab_size: int = Field(4096, ge=300)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    window_size: int = Field(128, gt=0)
    seed: int = 0
    # A randomly initialised model has near-uniform logits that LoRA (which never touches the
    # embeddings) cannot move far; full-parameter pretraining gives the base the word statistics
    # a real pretrained model would have (the demo: 500 steps, ~1M tokens). 0 keeps it random.
    pretrain_steps: int = Field(0, ge=0)
    pretrain_learning_rate: float = Field(3e-3, gt=0)  # peak; linear warm-up, then cosine decay to 10%
    pretrain_batch_size: int = Field(8, gt=0)
    pretrain_length: int = Field(128, gt=1)  # tokens per warm-up sequence
    # What the base (and its BPE) learns from. `train_split`: the fine-tuning train split.
    # `corpus`: every article of the CSV except the fine-tuning validation/test articles and the
    # topics in `pretrain_exclude_topics` (case-insensitive): a base that never saw a held-out
    # domain, which a LoRA run can then visibly adapt it to.
    pretrain_corpus: Literal["train_split", "corpus"] = "train_split"
    pretrain_exclude_topics: list[str] = Field(default_factory=list)
    pretrain_max_articles: int | None = Field(None, gt=0)  # `corpus` only: seeded subset of a big CSV
    # The BPE also learns from the fine-tuning train split (the model still pretrains on the corpus
    # above only): the held-out domain's words get tokens of their own instead of being spelt from
    # fragments, which the base never learns and the adapter can then learn to write.
    tokenizer_includes_train_split: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.pretrain_steps and self.pretrain_length > self.max_position_embeddings:
            raise ValueError(
                f"pretrain_length={self.pretrain_length} exceeds max_position_embeddings={self.max_position_embeddings}"
            )
        return self


class ModelConfig(_Strict):
    name: str = TINY_MODEL  # hub id, local path, or "tiny"
    revision: str | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32", "int8", "nf4"] = "auto"
    trust_remote_code: bool = False
    use_safetensors: bool = True  # never unpickle base weights (.bin); false only for a repo without safetensors
    attn_implementation: Literal["eager", "flash_attention_2"] | None = None
    gradient_checkpointing: bool = False
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


TARGET_SHORTHANDS = ("auto", "all-linear")
# `lora.init_weights` values that move part of the base weights into the adapter at init (lib/lora.py
# converts such an adapter back to a plain LoRA of twice the rank when it is saved).
BASE_MUTATING_INITS = ("pissa", "olora")


class LoraConfig(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    # "auto": PEFT's default targets for the base's architecture (its config.json `model_type`), or
    # every linear layer but the output head where PEFT has none; "all-linear": the latter always.
    target_modules: Literal["auto", "all-linear"] | list[str] = "auto"
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude vector per targeted layer
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    # PEFT's `init_lora_weights` values that train and reload exactly: true is Microsoft's (B = 0, a
    # no-op before training). eva/corda/loftq/lora_ga need data or a quantizer the pipeline does not pass.
    init_weights: Literal[True, "gaussian", "orthogonal", "pissa", "olora"] = True
    # LoRA+: B matrices learn at train.learning_rate x this ratio (the paper suggests ~16); None = plain AdamW.
    plus_lr_ratio: float | None = Field(None, ge=1)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets_named(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in TARGET_SHORTHANDS:
            raise ValueError("lora.target_modules must be 'auto', 'all-linear' or a list of module names")
        if isinstance(value, list) and not value:
            raise ValueError("lora.target_modules is an empty list: name at least one module, or use 'auto'")
        return value

    @model_validator(mode="after")
    def _variants_combine(self) -> LoraConfig:
        if self.init_weights in BASE_MUTATING_INITS and self.use_dora:
            # The save-time conversion back to plain LoRA (lib/lora.py) concatenates A and B only;
            # a DoRA magnitude vector has no such form, so the reloaded model would differ.
            raise ValueError(f"lora.init_weights={self.init_weights!r} cannot be combined with lora.use_dora=true")
        if self.init_weights == "orthogonal" and self.r % 2:
            raise ValueError(f"lora.init_weights='orthogonal' needs an even lora.r, got {self.r}")
        return self


class TrainConfig(_Strict):
    max_length: int = Field(512, gt=1)  # tokens per training sequence
    batch_size: int = Field(1, gt=0)  # micro-batch, sequences per forward pass
    grad_accum: int = Field(8, gt=0)
    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs when set
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    seed: int = 42
    log_every: int = Field(1, gt=0)  # optimizer steps between loss logs
    # Seconds: a step is also logged once this long has passed since the last logged one, and a
    # step slower than this logs micro-batch heartbeats, so a 1.3B run on CPU is never silent for minutes.
    progress_interval_s: float = Field(30.0, gt=0)
    eval_every: int | None = Field(None, gt=0)  # optimizer steps between validation losses
    checkpoint_every: int | None = Field(None, gt=0)
    num_processes: int = Field(1, gt=0)
    # torch intra-op threads: "auto" lets lib/threads.py choose for the machine (and OMP_NUM_THREADS
    # win when set); a number is used as it is.
    threads: Literal["auto"] | int = "auto"

    @model_validator(mode="after")
    def _threads_positive(self) -> TrainConfig:
        if isinstance(self.threads, int) and self.threads < 1:
            raise ValueError("train.threads must be 'auto' or a positive number of threads")
        return self


class EvalConfig(_Strict):
    batch_size: int = Field(8, gt=0)
    stride: int | None = Field(None, gt=0)  # None: disjoint windows of train.max_length
    num_samples: int = Field(8, ge=0)  # test articles generated from (title as prompt)
    max_new_tokens: int = Field(64, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0


class RegistryConfig(_Strict):
    model_name: str = Field("lenta-lora-demo", min_length=1)
    # Scored on the registered model's benchmark (one text set for every version), lower is
    # better. Bits per byte is the one that compares versions on different tokenizers fairly.
    champion_metric: Literal[
        "benchmark_perplexity", "benchmark_bits_per_byte", "benchmark_bits_per_char", "benchmark_word_perplexity"
    ] = "benchmark_bits_per_byte"
    # A challenger takes `champion` only if its value is below holder * (1 - min_improvement).
    min_improvement: float = Field(0.002, ge=0, lt=1)
    # The texts every version of the model is judged on, fixed when the model gets its first
    # version: None = that run's test split; a CSV path (its test split, selected with `data.*`);
    # "kaggle" = the test split of the Kaggle file. Later runs use the model's stored benchmark.
    benchmark: str | None = None


class TrackingConfig(_Strict):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    experiment: str = "lenta-lora"


class PipelineConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _fits_context(self) -> PipelineConfig:
        if self.lora.init_weights in BASE_MUTATING_INITS and self.model.precision in ("int8", "nf4"):
            # PiSSA/OLoRA rewrite the base weights; a quantized base cannot hold the residual exactly.
            raise ValueError(
                f"lora.init_weights={self.lora.init_weights!r} needs an unquantized base, "
                f"got model.precision={self.model.precision!r}"
            )
        if self.model.name == TINY_MODEL and self.train.max_length > self.model.tiny.max_position_embeddings:
            raise ValueError(
                f"train.max_length={self.train.max_length} exceeds the tiny model's context "
                f"(model.tiny.max_position_embeddings={self.model.tiny.max_position_embeddings})"
            )
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=20` -> (["train", "max_steps"], 20); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _section_keys(loc: tuple) -> list[str]:
    """The keys the config section at `loc` (a pydantic error location, the bad key last) accepts."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}): {error.error_count()} problem(s)"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":  # a typo: name the valid keys and the closest one
            valid = _section_keys(item["loc"])
            close = difflib.get_close_matches(str(item["loc"][-1]), valid, n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join([*map(str, item['loc'][:-1]), close[0]])}?" if close else ""
            lines.append(f"  - {where}: unknown key{hint} (valid keys here: {', '.join(valid)})")
            continue
        got = (
            f" (got {item['input']!r})"
            if item["type"] not in ("missing",) and not isinstance(item["input"], dict)
            else ""
        )
        lines.append(f"  - {where}: {item['msg']}{got}")
    return "\n".join(lines)


def build_config(raw: dict | None = None, overrides: list[str] = (), source: str = "defaults") -> PipelineConfig:
    """Validate a raw tree plus overrides; every problem is reported in one ConfigError."""
    tree = dict(raw or {})
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML profile (or the defaults when path is None) and apply dotted overrides."""
    if path is None:
        return build_config({}, overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (profiles live in configs/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return build_config(raw, overrides, source=str(path))


def flatten_config(config: PipelineConfig) -> dict[str, Any]:
    """Dotted key -> scalar, for logging as MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = ",".join(map(str, node)) if isinstance(node, list) else node

    walk("", config.model_dump(mode="json"))
    return flat
