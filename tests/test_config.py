"""Config parsing: YAML and overrides fill typed dataclasses; bad keys and values are named."""

from __future__ import annotations

import pytest

from echomamba_dist.config import ExperimentConfig, TrainConfig, apply_overrides, experiment_from_dict, flatten, load, save_config, to_dict
from echomamba_dist.errors import ConfigError


def test_defaults_are_the_papers_settings():
    cfg = experiment_from_dict({})
    assert cfg.model_name == "echomamba4rec"
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.eval_batch_size) == (1e-3, 2048, 4096)
    assert (cfg.train.patience, cfg.train.epochs, cfg.train.metric) == (10, 300, "ndcg@10")
    assert cfg.data.max_len == 50
    assert cfg.model.hidden_size == 64 and cfg.model.dropout == 0.2


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: sasrec\ntrain:\n  lr: 0.01\n  ks: [5, 10]\n")
    cfg = load(ExperimentConfig, path, ["train.epochs=3", "data.max_len=20", "run.name=abc"])
    assert cfg.model_name == "sasrec"
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 3 and cfg.train.ks == [5, 10]
    assert cfg.data.max_len == 20 and cfg.run.name == "abc"


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"trian": {}}, "unknown config key trian"),
        ({"train": {"lr2": 1}}, "train.lr2"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
        ({"train": {"epochs": 1.5}}, "train.epochs: expected an integer"),
        ({"train": {"precision": "fp8"}}, "train.precision: expected one of"),
        ({"train": {"progress": "yes"}}, "train.progress: expected true or false"),
        ({"train": {"batch_size": 0}}, "batch_size: must be >= 1"),
        ({"train": {"metric": "ndcg@20"}}, "metric: cut-off 20"),
        ({"train": {"batch_size": 3, "num_workers": 2}}, "not divisible by num_workers"),
        ({"model": {"name": "nope"}}, "model.name: unknown model 'nope'"),
        ({"model": {"hidden_sise": 3}}, "model.hidden_sise"),
        ({"data": {"synthetic": {"n_users": 0}}}, "n_users: must be >= 1"),
        ({"run": {"name": "a/b"}}, "name: expected a plain directory name"),
    ],
)
def test_bad_keys_and_values_are_named(data, needle):
    with pytest.raises(ConfigError) as info:
        experiment_from_dict(data)
    assert needle in str(info.value)


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.lr"):
        load(ExperimentConfig, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load(ExperimentConfig, tmp_path / "missing.yaml")
    path.write_text("train: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(ExperimentConfig, path)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        apply_overrides({}, ["train..lr=1"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_round_trip_through_yaml(tmp_path):
    cfg = experiment_from_dict({"model": {"name": "echomamba4rec", "combine": "concat"}, "train": {"seed": 7}})
    save_config(cfg, tmp_path / "out.yaml")
    again = load(ExperimentConfig, tmp_path / "out.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert not list(tmp_path.glob(".*tmp"))


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_run_dir_is_absolute(tmp_path):
    cfg = experiment_from_dict({"run": {"name": "x", "storage_path": str(tmp_path)}})
    assert cfg.run.run_dir == tmp_path.resolve() / "x"
    assert isinstance(cfg, ExperimentConfig) and isinstance(cfg.train, TrainConfig)


# ----------------------------------------------------------------------------------------------
# evaluate / recommend command configs (jobs/configs/evaluate-*.yaml, recommend-*.yaml)

from pathlib import Path  # noqa: E402

from echomamba_dist.config import EvaluateConfig, RecommendConfig  # noqa: E402

JOB_CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_command_config_file_then_set_then_flags(tmp_path):
    path = tmp_path / "rec.yaml"
    path.write_text("checkpoint: runs/a\noutput: out.parquet\ntop_k: 5\nusers: [17, u2]\n")
    job = load(RecommendConfig, path)
    assert (job.checkpoint, job.output, job.top_k, job.ray) == ("runs/a", "out.parquet", 5, False)
    assert job.users == ["17", "u2"]  # YAML integers become original-id strings
    job = load(RecommendConfig, path, ["top_k=7", "checkpoint=runs/b"], {"checkpoint": "runs/c", "top_k": None})
    assert (job.checkpoint, job.top_k) == ("runs/c", 7)  # a flag wins over --set; an absent flag (None) does not


@pytest.mark.parametrize(
    "cls, text, needle",
    [
        (EvaluateConfig, "split: test\n", "checkpoint: required"),
        (EvaluateConfig, "checkpoint: r\nsplit: train\n", "split: expected one of ['valid', 'test']"),
        (EvaluateConfig, "checkpoint: r\nk: 3\n", "unknown config key k"),
        (RecommendConfig, "checkpoint: r\n", "give exactly one"),
        (RecommendConfig, "checkpoint: r\noutput: o\nhistory: a b\n", "give exactly one"),
        (RecommendConfig, "checkpoint: r\noutput: o\ntop_k: 0\n", "top_k: expected >= 1"),
        (RecommendConfig, "checkpoint: r\noutput: o\nray: true\nusers: [a]\n", "drop history and users"),
        (RecommendConfig, "checkpoint: r\noutput: o\ngpu: true\n", "gpu: only with ray"),
        (RecommendConfig, "checkpoint: r\noutput: o\nactors: two\n", "actors: expected an integer"),
    ],
)
def test_command_config_errors_name_the_file_and_key(tmp_path, cls, text, needle):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(cls, path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_every_evaluate_and_recommend_job_config_loads():
    evaluates = sorted(JOB_CONFIGS.glob("evaluate-*.yaml"))
    recommends = sorted(JOB_CONFIGS.glob("recommend-*.yaml"))
    assert evaluates and recommends
    for path in evaluates:
        assert load(EvaluateConfig, path).checkpoint
    for path in recommends:
        job = load(RecommendConfig, path)
        assert job.output and job.ray  # the job configs are the batch (Ray Data) path


def test_train_samples_must_suit_the_model():
    base = {"model": {"name": "gru4rec"}}
    assert experiment_from_dict(base).sample_mode == "all_positions"  # auto: the model's own
    assert experiment_from_dict({**base, "train": {"samples": "prefix"}}).sample_mode == "prefix"
    assert experiment_from_dict({"train": {"samples": "prefix"}}).sample_mode == "prefix"  # EchoMamba4Rec's own
    with pytest.raises(ConfigError, match="train.samples: echomamba4rec trains on prefix samples, not all_positions"):
        experiment_from_dict({"train": {"samples": "all_positions"}})
    with pytest.raises(ConfigError, match="train.samples: bimamba4rec trains on prefix samples, not all_positions"):
        experiment_from_dict({"model": {"name": "bimamba4rec"}, "train": {"samples": "all_positions"}})
    bert = {"model": {"name": "bert4rec"}}
    assert experiment_from_dict(bert).sample_mode == "all_positions"
    assert experiment_from_dict({**bert, "train": {"samples": "prefix"}}).sample_mode == "prefix"  # RecBole's rows
    with pytest.raises(ConfigError, match="train.samples: expected one of"):
        experiment_from_dict({"train": {"samples": "some"}})


def test_every_job_config_loads_with_its_loader():
    """Each file in jobs/configs/ is a training run, a study, or an evaluate / recommend job, and
    loads without error through the loader its entrypoint uses."""
    from echomamba_dist.distributed.tune.study import load_study

    paths = sorted(JOB_CONFIGS.glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        if path.name.startswith("tune-"):
            load_study(path)
        elif path.name.startswith("evaluate-"):
            load(EvaluateConfig, path)
        elif path.name.startswith("recommend-"):
            load(RecommendConfig, path)
        else:
            cfg = load(ExperimentConfig, path)
            assert cfg.run.name, path
    # the paper's Beauty runs: the settings of §4.1
    for name in ("echomamba4rec-paper", "sasrec", "gru4rec", "mamba4rec"):
        cfg = load(ExperimentConfig, JOB_CONFIGS / f"beauty-{name}.yaml")
        assert cfg.model_name == name.removesuffix("-paper")
        assert (cfg.train.batch_size, cfg.train.lr, cfg.train.patience) == (2048, 1e-3, 10)
        assert cfg.data.max_len == 50 and cfg.model.hidden_size == 64 and cfg.model.dropout == 0.2
    assert load(ExperimentConfig, JOB_CONFIGS / "beauty-gru4rec.yaml").sample_mode == "prefix"


def test_the_beauty_default_is_the_searchs_best_trial():
    """jobs/configs/beauty-echomamba4rec.yaml holds what the Beauty search chose (its best.yaml in
    docs/results/), every searched key, with the paper's stopping rule and data in place of the
    study's; the paper's own settings stay in beauty-echomamba4rec-paper.yaml."""
    from echomamba_dist.distributed.tune.study import load_study

    study = load_study(JOB_CONFIGS / "tune-beauty-cpu.yaml")
    best = flatten(to_dict(load(ExperimentConfig, JOB_CONFIGS.parents[1] / "docs/results/tune-beauty-cpu/best.yaml")))
    default = flatten(to_dict(load(ExperimentConfig, JOB_CONFIGS / "beauty-echomamba4rec.yaml")))
    paper = flatten(to_dict(load(ExperimentConfig, JOB_CONFIGS / "beauty-echomamba4rec-paper.yaml")))
    searched = sorted(study.search)
    assert len(searched) >= 10 and "model.filter" in searched and "train.lr" in searched
    if best["model.filter"] is False:  # the filter's own settings build nothing without it
        searched = [k for k in searched if not k.startswith("model.filter_")]
    assert {k: default[k] for k in searched} == {k: best[k] for k in searched}
    assert any(default[k] != paper[k] for k in searched)
    for key in ("model.name", "model.hidden_size", "model.num_layers", "data.max_len", "train.batch_size"):
        assert default[key] == best[key] == paper[key], key
    assert (default["train.epochs"], default["train.patience"]) == (paper["train.epochs"], paper["train.patience"]) == (300, 10)


# ----------------------------------------------------------------------------------------------
# Values as a user means them; impossible values refused when the config is built (issue 14)


@pytest.mark.parametrize("raw, value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("0.01", 0.01), ("2", 2.0), ("+1e-2", 0.01)])
def test_exponent_without_a_dot_is_a_number(raw, value):
    cfg = load(ExperimentConfig, None, [f"train.lr={raw}", f"train.grad_clip={raw}"])
    assert cfg.train.lr == value and type(cfg.train.lr) is float
    assert cfg.train.grad_clip == value


def test_exponent_in_a_yaml_file_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 1e-5\n")  # PyYAML reads both as strings
    cfg = load(ExperimentConfig, path)
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-4, 1e-5)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.lr=nan"], "train.lr: expected a finite number, got 'nan'"),
        (["train.lr=1e-3x"], "train.lr: expected a number, got '1e-3x'"),
        (["train.grad_clip=-1"], "train.grad_clip: must be > 0 (or null: no clipping), got -1.0"),
        (["train.grad_clip=0"], "train.grad_clip: must be > 0"),
        (["data.max_len=60", "model.max_len=50"], "model.max_len: max_len is set once, as data.max_len (now 60)"),
        (["model.max_len=40"], "drop model.max_len (got 40) or set data.max_len=40"),
    ],
)
def test_impossible_values_are_refused_when_built(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load(ExperimentConfig, None, overrides)
    assert needle in str(info.value)


def test_models_without_a_length_limit_take_any_data_max_len():
    assert load(ExperimentConfig, None, ["model.name=gru4rec", "data.max_len=500"]).data.max_len == 500
    assert load(ExperimentConfig, None, ["train.grad_clip=null"]).train.grad_clip is None


@pytest.mark.parametrize("model", ["sasrec", "echomamba4rec", "bert4rec"])
def test_max_len_is_set_once_in_data_and_the_model_takes_it(model):
    from echomamba_dist.models.registry import build_model

    cfg = load(ExperimentConfig, None, ["data.max_len=37", f"model.name={model}"])
    assert cfg.model.max_len == 37
    net = build_model(cfg.model, n_items=20)
    rows = {"sasrec": 37, "bert4rec": 38}.get(model)  # BERT4Rec adds the mask position
    if rows is not None:
        assert net.position_embedding.num_embeddings == rows
    # the config a checkpoint stores (model.max_len written out) loads again; a different one does not
    again = experiment_from_dict(to_dict(cfg))
    assert again.model.max_len == 37
    with pytest.raises(ConfigError, match="model.max_len: max_len is set once"):
        experiment_from_dict({**to_dict(cfg), "model": {**to_dict(cfg.model), "max_len": 50}})
