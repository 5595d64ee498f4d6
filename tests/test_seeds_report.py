"""benchmarks/seeds.py's report without training: the issue's targets with their differences, the
gap to the paper's numbers, and the note on a dataset that is not the paper's version."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import seeds  # noqa: E402


def _record(model: str, seed: int, paper: tuple[float, float, float], history: tuple[float, float, float]) -> dict:
    metrics = dict(zip(("hr@10", "ndcg@10", "mrr@10"), paper))
    return {"model": model, "seed": seed, "samples": "prefix", "test": metrics, "valid": metrics,
            "epochs_run": 20, "best_epoch": 9, "stopped_early": True, "seconds_per_epoch": 90.0,
            "protocols": {"paper": metrics, "exclude_history": dict(zip(("hr@10", "ndcg@10", "mrr@10"), history))}}


def _report(dataset: str, summary: dict) -> dict:
    return {"dataset": dataset, "paper_dataset": seeds.paper_key(dataset), "complete": True, "date": "2026-12-02",
            "git": {"commit": "0123456789abcdef", "dirty": False}, "seeds": [1, 2], "command": "python benchmarks/seeds.py",
            "hardware": {"device": "cpu", "cpu": "x86", "cpu_cores": 2, "torch": "2.13.0"},
            "summary": summary, "runs": [], "pending": [], "comparisons": [],
            "targets": seeds.targets(summary, seeds.paper_key(dataset))}


def _summary() -> dict:
    echo = [_record("echomamba4rec", 1, (0.0690, 0.0440, 0.0360), (0.07, 0.05, 0.04)),
            _record("echomamba4rec", 2, (0.0710, 0.0460, 0.0370), (0.07, 0.05, 0.04))]
    sasrec = [_record("sasrec", 1, (0.0750, 0.0370, 0.0250), (0.08, 0.05, 0.04))]
    return {"tuned": seeds.summarize("tuned", echo, {}) | {"config_path": "a.yaml"},
            "sasrec": seeds.summarize("sasrec", sasrec, {}) | {"config_path": "b.yaml"}}


def test_targets_say_by_how_much_each_is_met_or_missed():
    found = {(t["model"], t["metric"]): t for t in seeds.targets(_summary(), "beauty")}
    hr = found[("echomamba4rec", "hr@10")]  # mean 0.0700 against 0.0833
    assert hr["measured"] == pytest.approx(0.0700) and hr["met"] is False
    assert hr["difference"] == pytest.approx(0.0700 - 0.0833) and hr["relative"] == pytest.approx(0.0700 / 0.0833 - 1)
    ndcg = found[("echomamba4rec", "ndcg@10")]  # mean 0.0450 against 0.0438
    assert ndcg["met"] is True and ndcg["difference"] == pytest.approx(0.0012)
    assert found[("sasrec", "hr@10")]["met"] is True  # 0.0750 against 0.0739
    assert seeds.targets(_summary(), "video-games") == []  # the targets are Beauty's


def test_the_markdown_shows_targets_and_the_gap_to_the_paper():
    text = seeds.render_markdown(_report("amazon-beauty", _summary()))
    # the paper's EchoMamba4Rec: 0.0833 / 0.0438; ours 0.0700 / 0.0450
    assert "| tuned | EchoMamba4Rec | 0.0700 ± 0.0014 | 0.0450 ± 0.0014 | 0.0365 ± 0.0007 | 0.0833 | 0.0438 | -16.0%, +2.7% |" in text
    assert "| EchoMamba4Rec | hr@10 | ≥ 0.0833 | 0.0700 | -0.0133 (-16.0%) | no |" in text
    assert "| EchoMamba4Rec | ndcg@10 | ≥ 0.0438 | 0.0450 | +0.0012 (+2.7%) | yes |" in text
    assert "**Note:**" not in text
    # protocol 2 has no paper columns: the paper did not measure it
    protocol2 = text.split("## Protocol 2")[1].split("## Runs")[0]
    assert "paper" not in protocol2.split("\n", 1)[1] and "| tuned | EchoMamba4Rec | 0.0700 ± 0.0000 |" in protocol2


def test_another_version_of_the_dataset_is_noted_without_the_papers_numbers_or_targets():
    text = seeds.render_markdown(_report("amazon-video-games", _summary()))
    assert "**Note:** Our `amazon-video-games.txt` is a different version of the dataset than the paper's" in text
    assert "## Targets" not in text
    assert "paper HR@10" not in text and "vs paper" not in text  # models are compared with each other there


def test_the_epoch_limit_mark_only_where_a_run_reached_it():
    text = seeds.render_markdown(_report("amazon-beauty", _summary()))  # every run stopped early
    assert "†" not in text and "Best epoch counts from 1." in text
    capped = _record("sasrec", 2, (0.0740, 0.0360, 0.0240), (0.08, 0.05, 0.04)) | {"stopped_early": False}
    summary = _summary() | {"sasrec": seeds.summarize("sasrec", [capped], {}) | {"config_path": "b.yaml"}}
    text = seeds.render_markdown(_report("amazon-beauty", summary))
    assert "| sasrec † | SASRec |" in text and "| tuned | EchoMamba4Rec |" in text
    assert "† a run of this config reached its epoch limit before early stopping." in text


def test_settings_show_every_key_that_differs_between_configs():
    base = {"model": {"name": "bert4rec", "dropout": 0.2, "mask_prob": 0.2, "mask_last_prob": 0.5},
            "train": {"lr": 0.001, "seed": 1}, "data": {"max_len": 50, "synthetic": {"n_users": 10}},
            "run": {"name": "a"}, "tracking": {"experiment": "x"}}
    last_only = {**base, "model": {**base["model"], "mask_last_prob": 1.0}, "run": {"name": "b"},
                 "tracking": {"experiment": "y"}}
    other_data = {**base, "data": {**base["data"], "synthetic": {"n_users": 20}}}
    shown = seeds.shown_settings([base, last_only])
    assert shown[:len(seeds.SHOWN_SETTINGS)] == list(seeds.SHOWN_SETTINGS)
    assert shown[len(seeds.SHOWN_SETTINGS):] == ["model.mask_last_prob"]  # not run.name, not tracking
    assert seeds.shown_settings([base, base]) == list(seeds.SHOWN_SETTINGS)
    assert seeds.shown_settings([base, other_data])[len(seeds.SHOWN_SETTINGS):] == ["data.synthetic"]
    # a key only one model has is not a difference; one both have, set apart, is
    sasrec = {**base, "model": {"name": "sasrec", "dropout": 0.2}}
    assert seeds.shown_settings([base, sasrec]) == list(seeds.SHOWN_SETTINGS)
    assert seeds.shown_settings([base, sasrec, last_only])[len(seeds.SHOWN_SETTINGS):] == ["model.mask_last_prob"]
