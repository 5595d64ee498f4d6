"""Models by name: `MODELS[name] = (model class, config class)`.

`model.name` in a config picks the entry; `build_model` turns a config (or a bare name, for the
defaults) into a model for `n_items` items. `list_models` feeds `echomamba models`.
"""

from __future__ import annotations

from typing import Any

from echomamba_dist.models.base import SequentialRecommender
from echomamba_dist.models.bert4rec import BERT4Rec, BERT4RecConfig
from echomamba_dist.models.bimamba4rec import BiMamba4Rec, BiMamba4RecConfig
from echomamba_dist.models.bimambaformer4rec import (
    BiMambaformer4Rec,
    BiMambaformer4RecConfig,
)
from echomamba_dist.models.echomamba4rec import EchoMamba4Rec, EchoMamba4RecConfig
from echomamba_dist.models.gru4rec import GRU4Rec, GRU4RecConfig
from echomamba_dist.models.mamba4rec import Mamba4Rec, Mamba4RecConfig
from echomamba_dist.models.narm import NARM, NARMConfig
from echomamba_dist.models.sasrec import SASRec, SASRecConfig

MODELS: dict[str, tuple[type[SequentialRecommender], type]] = {
    "echomamba4rec": (EchoMamba4Rec, EchoMamba4RecConfig),
    "sasrec": (SASRec, SASRecConfig),
    "gru4rec": (GRU4Rec, GRU4RecConfig),
    "mamba4rec": (Mamba4Rec, Mamba4RecConfig),
    "narm": (NARM, NARMConfig),
    "bert4rec": (BERT4Rec, BERT4RecConfig),
    "bimamba4rec": (BiMamba4Rec, BiMamba4RecConfig),
    "bimambaformer4rec": (BiMambaformer4Rec, BiMambaformer4RecConfig),
}

# Catalogue size used for the parameter counts of `list_models`: Amazon-Beauty's 12,101 items
# (paper, Table 1). Most of a model's parameters are its (n_items + 1) x H item embeddings.
COUNT_N_ITEMS = 12101


def model_config_class(name: str) -> type:
    """The config dataclass registered under `name`.

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    try:
        return MODELS[name][1]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def model_class(name: str) -> type[SequentialRecommender]:
    """The model class registered under `name` (e.g. to read its `sample_mode`).

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    model_config_class(name)  # raises the friendly KeyError
    return MODELS[name][0]


def build_model(config: Any, n_items: int) -> SequentialRecommender:
    """A model for `n_items` items from its config dataclass, or from a name (its defaults).

    Raises:
        KeyError: unknown model name.
        TypeError: `config` is not the config class registered under its name.
    """
    if isinstance(config, str):
        config = model_config_class(config)()
    name = getattr(config, "name", None)
    model_cls, config_cls = MODELS.get(name, (None, None))
    if model_cls is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if not isinstance(config, config_cls):
        raise TypeError(
            f"model {name!r} expects a {config_cls.__name__}, got {type(config).__name__}"
        )
    return model_cls(n_items, config)


def count_parameters(model: SequentialRecommender) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def list_models(n_items: int = COUNT_N_ITEMS) -> list[tuple[str, str, int]]:
    """(name, sample mode, parameter count at default settings for `n_items` items) per model."""
    rows = []
    for name, (model_cls, config_cls) in MODELS.items():
        model = model_cls(n_items, config_cls())
        rows.append((name, model_cls.sample_mode, count_parameters(model)))
    return rows
