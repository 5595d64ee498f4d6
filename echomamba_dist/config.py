"""Typed configuration: dataclasses filled from YAML, dicts and `key=value` overrides.

Every field has a docstring-style comment and every dataclass checks itself in `__post_init__`.
`from_dict` rejects unknown keys and wrongly typed values with an error naming the dotted key, so
a typo never silently falls back to a default (the RecBole global dict is what we avoid).

The model section is polymorphic: `model.name` picks a registered model, whose own config
dataclass (see `echomamba_dist.models.registry`) parses the remaining keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from echomamba_dist.errors import ConfigError
from echomamba_dist.io import write_text_atomic
from echomamba_dist.models.registry import model_class, model_config_class

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Generic dict <-> dataclass machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue  # the next member of the union may take it
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: take it as the number meant
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and bad values raise ConfigError.

    Args:
        cls: a dataclass type.
        data: a mapping of field names to values (nested mappings for nested dataclasses).
        prefix: the dotted path of `data` inside the whole config, used in error messages.
    Returns:
        An instance of `cls`; fields missing from `data` keep their defaults.
    Raises:
        ConfigError: naming the dotted key that is unknown, mistyped or out of range.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; valid keys{' of ' + prefix if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}.{exc}") from None
        raise


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON-safe) form of a config dataclass, recursively."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings to a nested dict (values parsed as YAML scalars).

    Raises:
        ConfigError: an override without `=`, or with an empty key.
    """
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=0.001")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        set_dotted(out, key, yaml.safe_load(raw) if raw.strip() else "", where=f"override {item!r}")
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any, *, where: str) -> None:
    """Set `data["a"]["b"] = value` for `key` "a.b", creating missing sections, in place.

    Raises:
        ConfigError: a part of the key names a value, not a section (`where` says whose key).
    """
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


# ----------------------------------------------------------------------------------------------
# The sections


@dataclass(kw_only=True)
class SyntheticConfig:
    """The built-in synthetic interaction log (see `echomamba_dist.data.synthetic`)."""

    n_users: int = 2000  # number of users generated
    n_items: int = 500  # size of the item catalogue
    n_topics: int = 10  # latent topics that drive item-to-item transitions
    mean_length: float = 12.0  # mean interactions per user (geometric-ish, at least min_length)
    min_length: int = 5  # every user gets at least this many interactions
    popularity_skew: float = 1.0  # Zipf exponent of item popularity inside a topic
    topic_stickiness: float = 0.8  # probability that the next item stays in the current topic
    seed: int = 0  # generator seed

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "n_topics", "min_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.n_topics > self.n_items:
            raise ConfigError(f"n_topics: must be <= n_items ({self.n_items}), got {self.n_topics}")
        if self.mean_length < self.min_length:
            raise ConfigError(f"mean_length: must be >= min_length ({self.min_length})")
        if not 0.0 <= self.topic_stickiness <= 1.0:
            raise ConfigError(f"topic_stickiness: must be in [0, 1], got {self.topic_stickiness}")


@dataclass(kw_only=True)
class DataSettings:
    """Which prepared dataset to train on, and how sequences become model input."""

    path: str | None = None  # a directory written by `echomamba prepare`; None: the synthetic set
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_len: int = 50  # sequences keep their most recent `max_len` items
    bucketing: bool = True  # group batches by length and pad each only to its longest sequence

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError(f"max_len: must be >= 2, got {self.max_len}")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation loop; defaults are the paper's settings (§4.1)."""

    epochs: int = 300  # at most this many epochs
    patience: int = 10  # stop after this many epochs without a better validation NDCG@10
    batch_size: int = 2048  # global batch; each of W workers takes batch_size // W
    eval_batch_size: int = 4096  # users scored at once in validation and test
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay (never applied to A_log, D, norms, biases)
    grad_clip: float | None = None  # clip the global gradient norm to this value, if set
    seed: int = 42  # seeds torch, numpy and the sample shuffle
    num_workers: int = 1  # Ray Train workers (DDP world size)
    use_gpu: bool = False  # one GPU per worker (NCCL) instead of CPU (gloo)
    cpus_per_worker: float | None = None  # Ray CPUs per worker; None: cores // workers locally, 1 on a cluster
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda" when called directly
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (GPU); the scan state stays fp32
    compile: bool = False  # torch.compile the model (the selective scan stays an opaque kernel)
    metric: str = "ndcg@10"  # validation metric for early stopping and checkpoint selection
    ks: list[int] = field(default_factory=lambda: [10])  # cut-offs for HR/NDCG/MRR/Recall
    exclude_history: bool = False  # mask the user's history items when ranking (paper: off)
    final_test: bool = True  # score the test split once with the best model (tuning trials: off)
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)
    progress: bool = True  # progress bars (only shown when stdout is a terminal)
    fail_at_step: int | None = None  # fault injection: kill worker rank 1 (or 0) once at this step
    ray: bool = True  # run through Ray Train (False: the per-worker function in this process)
    samples: Literal["auto", "prefix", "all_positions"] = "auto"  # training samples: the model's own (auto), every prefix as a row (RecBole's augmentation; causal models), or every position of a user's row
    data_sharding: Literal["exact", "ray"] = "exact"  # on Ray: exact slices of each seeded global batch, or Ray's streaming split (docs/distributed.md)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ConfigError(f"patience: must be >= 0, got {self.patience}")
        if not (math.isfinite(self.lr) and self.lr > 0):  # nan and inf train nothing
            raise ConfigError(f"lr: must be a finite number > 0, got {self.lr}")
        if self.grad_clip is not None and not (0 < self.grad_clip < math.inf):  # NaN fails too
            raise ConfigError(f"grad_clip: must be > 0 (or null: no clipping), got {self.grad_clip}")
        if self.batch_size % self.num_workers:
            raise ConfigError(
                f"batch_size: {self.batch_size} is not divisible by num_workers={self.num_workers}"
            )
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks: expected positive cut-offs, got {self.ks}")
        name, _, k = self.metric.partition("@")
        if name not in ("hr", "ndcg", "mrr", "recall") or not k.isdigit():
            raise ConfigError(f"metric: expected e.g. ndcg@10, got {self.metric!r}")
        if int(k) not in self.ks:
            raise ConfigError(f"metric: cut-off {k} of {self.metric} is not in ks={self.ks}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: expected auto, cpu or cuda, got {self.device!r}")


@dataclass(kw_only=True)
class RunSettings:
    """Where a run lives. A stable name makes a restarted run resume its checkpoints."""

    name: str = "echomamba4rec-synthetic"  # run name: checkpoints live in storage_path/name
    storage_path: str = "runs"  # local directory (or shared storage on a cluster)
    resume: bool = True  # continue from the latest checkpoint of the same name if there is one
    keep_checkpoints: int = 2  # best k checkpoints kept (Ray CheckpointConfig)
    max_failures: int = 3  # worker failures tolerated before the run fails (Ray FailureConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name: expected a plain directory name, got {self.name!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve() / self.name


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking. The URI comes from here, else MLFLOW_TRACKING_URI, else the embedded
    default: a SQLite store `./mlflow.db` with artifacts in `./mlartifacts` (what `mlflow ui`
    started in the same directory shows)."""

    enabled: bool = True  # track this run in MLflow (rank 0)
    tracking_uri: str | None = None  # e.g. http://127.0.0.1:5000; None: env or embedded store
    experiment: str = "echomamba"  # MLflow experiment name
    log_model: bool = True  # log the best model as an MLflow pyfunc model at the end
    register: bool = True  # register that model in the MLflow Model Registry (with log_model)
    registered_model: str | None = None  # its registry name; None: the run name (a tune study: the study name)
    model_alias: str | None = None  # alias set on the new version, e.g. champion (a tune study always sets champion)

    def __post_init__(self) -> None:
        if self.registered_model is not None and (not self.registered_model.strip() or set("/:") & set(self.registered_model)):
            raise ConfigError(f"tracking.registered_model: expected a name without '/' or ':', got {self.registered_model!r}")
        alias = self.model_alias
        if alias is not None and (  # MLflow reserves `latest` and `v<N>` (version numbers)
            not alias.replace("-", "_").isidentifier() or alias.lower() == "latest"
            or (alias[:1] == "v" and alias[1:].isdigit())
        ):
            raise ConfigError(f"tracking.model_alias: expected letters, digits, '_' or '-', not 'latest' or v<N>, "
                              f"got {self.model_alias!r}")

    def resolved_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: ./mlartifacts for the embedded store."""
        uri = self.resolved_uri()
        if uri.startswith("sqlite:///"):
            return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return None


@dataclass(kw_only=True)
class ExperimentConfig:
    """Everything one training run needs: data, model, training, run location and tracking."""

    data: DataSettings = field(default_factory=DataSettings)
    model: Any = None  # a registered model's config dataclass; None: EchoMamba4Rec defaults
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunSettings = field(default_factory=RunSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.model is None or isinstance(self.model, dict):
            self.model = model_config_from_dict(_model_section(self.model or {}, self.data.max_len), prefix="model")
        elif not hasattr(self.model, "name"):
            raise ConfigError(f"model: expected a mapping with a model name, got {self.model!r}")
        if hasattr(self.model, "max_len"):  # max_len is set once, in data: the model takes it
            self.model.max_len = self.data.max_len

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build and validate from a nested dict (`experiment_from_dict`)."""
        return experiment_from_dict(data)

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def sample_mode(self) -> str:
        """The samples this run trains on: `train.samples`, or the model's own when `auto`."""
        return model_class(self.model_name).sample_mode if self.train.samples == "auto" else self.train.samples

    def check(self) -> None:
        """Checks across sections. Raises ConfigError naming the key."""
        supported = model_class(self.model_name).supported_samples
        if self.train.samples != "auto" and self.train.samples not in supported:
            raise ConfigError(
                f"train.samples: {self.model_name} trains on {' or '.join(supported)} samples, not {self.train.samples}"
            )


def model_config_from_dict(data: dict[str, Any], *, prefix: str = "model") -> Any:
    """Parse the model section: `name` picks the registered config dataclass for the rest."""
    data = dict(data)
    name = data.get("name", "echomamba4rec")
    if not isinstance(name, str):
        raise ConfigError(f"{prefix}.name: expected a model name, got {name!r}")
    try:
        cls = model_config_class(name)
    except KeyError as exc:
        raise ConfigError(f"{prefix}.name: {exc.args[0]}") from None
    data["name"] = name
    return from_dict(cls, data, prefix=prefix)


def experiment_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build an ExperimentConfig from a nested dict (e.g. parsed YAML), validating every key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    cfg = from_dict(ExperimentConfig, data)  # __post_init__ parses the model section, with data.max_len
    cfg.check()
    return cfg


def _model_section(model: Any, max_len: int) -> Any:
    """The model section without `max_len`, which `data.max_len` sets for every model (the
    longest input, and the size of position tables and filters). A `model.max_len` equal to it
    is accepted, as in the configs that checkpoints and earlier versions wrote.

    Raises:
        ConfigError: `model.max_len` differs from `data.max_len`.
    """
    if not isinstance(model, dict) or "max_len" not in model:
        return model
    model = dict(model)
    given = model.pop("max_len")
    if given != max_len:
        raise ConfigError(f"model.max_len: max_len is set once, as data.max_len (now {max_len}), which the model "
                          f"takes; drop model.max_len (got {given!r}) or set data.max_len={given!r}")
    return model


def read_yaml_mapping(path: str | os.PathLike, *, what: str = "config file") -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is {}).

    Raises:
        ConfigError: naming the file: missing, not YAML, or not a mapping at the top level.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def load(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None,
         flags: dict[str, Any] | None = None) -> T:
    """The one config loader of every command: the YAML file, then `--set key=value` overrides,
    then the command's own flags, each over the one before; then parsed and validated as `cls`.

    Args:
        cls: ExperimentConfig (train), EvaluateConfig, RecommendConfig, PrepareConfig, or any
            config class; one with a `from_dict` classmethod parses itself (ExperimentConfig's
            model section, a study's search space), any other dataclass goes through `from_dict`.
        path: a YAML file (optional).
        overrides: `key=value` strings, dotted keys into sections, values parsed as YAML scalars.
        flags: top-level keys from command-line flags; None values are flags not given.
    Returns:
        The validated config.
    Raises:
        ConfigError: naming the file (when one is given) and the dotted key.
    """
    data: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    if overrides:
        data = apply_overrides(data, overrides)
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    try:
        parse = getattr(cls, "from_dict", None)
        return parse(data) if parse is not None else from_dict(cls, data)
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML atomically (temporary file, then rename)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False), what="config file")


# ----------------------------------------------------------------------------------------------
# The evaluate and recommend commands (jobs/configs/evaluate-*.yaml, recommend-*.yaml)


@dataclass
class EvaluateConfig:
    """`echomamba evaluate` / `jobs/evaluate.py`: score a checkpoint on one split."""

    checkpoint: str = ""  # checkpoint directory, or a run directory (its best checkpoint); required
    data: str | None = None  # prepared dataset directory; None: the one the checkpoint trained on
    split: Literal["valid", "test"] = "test"
    exclude_history: bool = False  # mask the user's history items when ranking
    output: str | None = None  # JSON file for the metrics (written atomically); None: printed only
    overwrite: bool = False  # replace an existing output, if it is a metrics report this project wrote
    ignore_fingerprint: bool = False  # score a dataset other than the one trained on (same item count)
    # "best": the best weights the checkpoint holds (best validation so far); "checkpoint": the
    # weights of the checkpoint's own epoch (e.g. how a later epoch scores on test)
    weights: Literal["best", "checkpoint"] = "best"

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (a checkpoint directory or a run directory)")


@dataclass
class RecommendConfig:
    """`echomamba recommend` / `jobs/recommend.py`: top-K items, with original ids.

    Either `output` (all users, or `users`, written to Parquet) or `history` (one inline history,
    printed).
    """

    checkpoint: str = ""  # checkpoint directory, or a run directory (its best checkpoint); required
    data: str | None = None  # prepared dataset directory; None: the one the checkpoint trained on
    output: str | None = None  # Parquet file; with `ray`, a directory of Parquet files
    overwrite: bool = False  # replace an existing output, if it holds recommendations this project wrote
    history: str | None = None  # original item ids, oldest first, space-separated
    users: list[str | int] | None = None  # original user ids; None: every user of the dataset
    top_k: int = 10
    include_history: bool = False  # allow items the user already interacted with
    ignore_fingerprint: bool = False  # recommend on a dataset other than the one trained on (same item count)
    ray: bool = False  # score on Ray Data with a pool of model-holding actors
    actors: int = 2  # actors in the pool (with `ray`)
    gpu: bool = False  # one GPU per actor (with `ray`)

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (a checkpoint directory or a run directory)")
        if (self.output is None) == (self.history is None):
            raise ConfigError("output / history: give exactly one (output: a Parquet path for users; history: 'ITEM ITEM ...')")
        if self.top_k < 1:
            raise ConfigError(f"top_k: expected >= 1, got {self.top_k}")
        if self.actors < 1:
            raise ConfigError(f"actors: expected >= 1, got {self.actors}")
        if self.ray and (self.history is not None or self.users is not None):
            raise ConfigError("ray: scores every user of the dataset; drop history and users, or set ray: false")
        if self.gpu and not self.ray:
            raise ConfigError("gpu: only with ray: true (the actors hold the model on GPUs)")
        if self.users is not None:
            self.users = [str(u) for u in self.users]  # YAML reads `users: [17, 42]` as integers


@dataclass
class PrepareConfig:
    """`echomamba prepare`: an interaction log -> a prepared dataset (see `data.prepare`)."""

    input: str = ""  # the interaction log (sequence text, .inter, CSV/TSV, ratings.dat, Parquet); required
    output: str = ""  # the prepared dataset directory (written atomically); required
    format: str | None = None  # force the input format; None: detected from the file
    min_rating: float | None = None  # drop interactions rated below this
    k_core: int = 5  # iterative k-core on users and items (0: off)
    keep_duplicates: bool = False  # keep repeated (user, item) pairs
    ray: bool = True  # run the transforms on Ray Data (False: in this process)
    overwrite: bool = False  # replace an existing output directory (a prepared dataset)

    def __post_init__(self) -> None:
        if not self.input or not self.output:
            raise ConfigError(f"{'input' if not self.input else 'output'}: required (--{'input' if not self.input else 'output'})")
