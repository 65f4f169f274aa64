from pathlib import Path

import pytest

from lib.config import ConfigError, PipelineConfig, build_config, flatten_config, load_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"))


def test_there_are_shipped_profiles():
    assert {"demo.yaml", "gpt-neo-1.3b.yaml", "gpt-neo-1.3b-fast.yaml", "rugpt3small.yaml"} <= {p.name for p in CONFIGS}


def test_the_russian_native_profile_differs_from_the_fast_one_only_in_its_base():
    """Same data, windows, LoRA and training: a comparison of the two bases varies the base alone."""
    root = Path(__file__).resolve().parent.parent / "configs"
    fast, russian = load_config(root / "gpt-neo-1.3b-fast.yaml"), load_config(root / "rugpt3small.yaml")
    assert russian.model.name == "ai-forever/rugpt3small_based_on_gpt2" and russian.lora.target_modules == "auto"
    for section in ("data", "train", "eval"):
        assert getattr(russian, section) == getattr(fast, section), section
    assert (russian.lora.r, russian.lora.alpha, russian.lora.dropout) == (
        fast.lora.r,
        fast.lora.alpha,
        fast.lora.dropout,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_profile_loads(path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    assert config.train.max_length > 1 and config.lora.target_modules


def test_seed_profile_is_the_seed_recipe():
    c = load_config(Path(__file__).resolve().parent.parent / "configs" / "gpt-neo-1.3b.yaml")
    assert c.model.name == "EleutherAI/gpt-neo-1.3B" and c.model.precision == "int8"
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (8, 16, 0.1)
    assert (c.train.max_length, c.train.batch_size, c.train.grad_accum, c.train.epochs) == (512, 1, 8, 1)
    assert c.data.max_articles == 10_000 and c.data.packing is False and c.data.source == "kaggle"


def test_overrides_are_typed_and_layered():
    c = build_config({"train": {"max_steps": 5}}, ["train.max_steps=20", "lora.target_modules=[q_proj]"])
    assert c.train.max_steps == 20 and c.lora.target_modules == ["q_proj"]


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        build_config({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_flatten_gives_dotted_scalars():
    flat = flatten_config(PipelineConfig())
    assert flat["lora.r"] == 8 and flat["lora.target_modules"] == "auto"
    assert (
        flatten_config(build_config({}, ["lora.target_modules=[q_proj, v_proj]"]))["lora.target_modules"]
        == "q_proj,v_proj"
    )
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


def test_a_mistyped_key_names_the_valid_keys_and_the_closest_one():
    with pytest.raises(ConfigError) as caught:
        build_config({}, ["train.max_step=3", "model.tiny.hiden_size=3", "nosuch=1"])
    text = str(caught.value)
    assert "train.max_step: unknown key; did you mean train.max_steps? (valid keys here: max_length," in text
    assert "model.tiny.hiden_size: unknown key; did you mean model.tiny.hidden_size?" in text
    assert "nosuch: unknown key (valid keys here: data, model, lora, train, eval, registry, tracking)" in text


def test_lora_variants_validate_with_errors_naming_the_field():
    lora = build_config({}).lora
    assert (lora.target_modules, lora.use_dora, lora.use_rslora, lora.init_weights, lora.plus_lr_ratio) == (
        "auto",
        False,
        False,
        True,
        None,
    )
    c = build_config(
        {},
        [
            "lora.use_dora=true",
            "lora.use_rslora=true",
            "lora.init_weights=gaussian",
            "lora.plus_lr_ratio=16",
            "lora.target_modules=all-linear",
        ],
    )
    assert (c.lora.use_dora, c.lora.use_rslora, c.lora.init_weights, c.lora.plus_lr_ratio) == (
        True,
        True,
        "gaussian",
        16,
    )
    for overrides, fragment in [
        (["lora.target_modules=q_proj"], "lora.target_modules must be 'auto', 'all-linear' or a list"),
        (["lora.target_modules=[]"], "lora.target_modules is an empty list"),
        (["lora.init_weights=eva"], "lora.init_weights: Input should be True, 'gaussian', 'orthogonal', 'pissa' or"),
        (
            ["lora.init_weights=pissa", "lora.use_dora=true"],
            "lora.init_weights='pissa' cannot be combined with lora.use_dora",
        ),
        (["lora.init_weights=olora", "model.precision=nf4"], "lora.init_weights='olora' needs an unquantized base"),
        (["lora.init_weights=orthogonal", "lora.r=5"], "needs an even lora.r, got 5"),
        (["lora.plus_lr_ratio=0.5"], "lora.plus_lr_ratio: Input should be greater than or equal to 1"),
    ]:
        with pytest.raises(ConfigError) as error:
            build_config({}, overrides)
        assert fragment in str(error.value), (overrides, str(error.value))
