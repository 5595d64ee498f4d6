"""The `echomamba` command line: prepare | train | evaluate | recommend | models | tune.

`echomamba train` with no argument is the main job: EchoMamba4Rec on the built-in synthetic
dataset through Ray Train on a local Ray, ending with a metrics table. Errors a user can fix
(bad config, bad data, bad checkpoint) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from echomamba_dist import __version__
from echomamba_dist.config import (
    EvaluateConfig,
    ExperimentConfig,
    PrepareConfig,
    RecommendConfig,
    load,
    to_dict,
)
from echomamba_dist.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteScores,
    TrainingDiverged,
    WorkerError,
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see jobs/configs/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.num_workers=2 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echomamba", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"echomamba-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # every command: a config file, then --set overrides, then its flags (a flag given wins)
    p = sub.add_parser("prepare", help="turn an interaction log into a prepared dataset")
    _add_config_args(p)
    p.add_argument("--input", help="interaction log (sequence text, .inter, CSV/TSV, ratings.dat, Parquet)")
    p.add_argument("--output", help="output directory (written atomically)")
    p.add_argument("--format", help="force the input format (default: detected)")
    p.add_argument("--min-rating", type=float, help="drop interactions rated below this")
    p.add_argument("--k-core", type=int, help="iterative k-core on users and items (0: off; default 5)")
    p.add_argument("--keep-duplicates", action="store_true", default=None, help="keep repeated (user, item) pairs")
    p.add_argument("--no-ray", dest="ray", action="store_false", default=None, help="prepare in this process instead of on Ray Data")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")

    p = sub.add_parser(
        "train", help="train a model; without --config, the main job (echomamba_dist/configs/main.yaml)"
    )
    _add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = sub.add_parser("evaluate", help="score a checkpoint on a prepared dataset")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--data", help="prepared dataset directory (default: the one trained on)")
    p.add_argument("--split", choices=["valid", "test"], help="default: test")
    p.add_argument("--exclude-history", action="store_true", default=None, help="mask history items when ranking")
    p.add_argument("--ignore-fingerprint", action="store_true", default=None,
                   help="score a dataset other than the one trained on (same item count)")
    p.add_argument("--weights", choices=["best", "checkpoint"],
                   help="best (default): the best weights the checkpoint holds; checkpoint: its own epoch's")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --output (a report it wrote)")

    p = sub.add_parser("recommend", help="top-K items for users of a prepared dataset, or for one history")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--data", help="prepared dataset directory (default: the one trained on)")
    p.add_argument("--output", help="Parquet file for all users' recommendations")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --output (recommendations it wrote)")
    p.add_argument("--history", help="inline history of original item ids, oldest first, space-separated")
    p.add_argument("--users", help="comma-separated original user ids (default: all users)")
    p.add_argument("-k", "--top-k", type=int, help="default: 10")
    p.add_argument("--include-history", action="store_true", default=None, help="allow items the user already has")
    p.add_argument("--ignore-fingerprint", action="store_true", default=None,
                   help="recommend on a dataset other than the one trained on (same item count)")
    p.add_argument("--ray", action="store_true", default=None, help="score all users on Ray Data with a pool of actors; --output is a directory")
    p.add_argument("--actors", type=int, help="model-holding actors (with --ray; default 2)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per actor (with --ray)")

    sub.add_parser("models", help="list the models with their parameter counts")

    p = sub.add_parser("tune", help="hyperparameter search on Ray Tune")
    _add_config_args(p)
    p.add_argument("--retry-failed", action="store_true",
                   help="when resuming a study: run its failed trials again, each from its last checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `echomamba` script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the commands say what they did; MLflow's INFO lines and progress bars would repeat it
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    command = args.command or "train"
    if args.command is None:
        args = parser.parse_args(["train"])
    try:
        return {
            "prepare": cmd_prepare,
            "train": cmd_train,
            "evaluate": cmd_evaluate,
            "recommend": cmd_recommend,
            "models": cmd_models,
            "tune": cmd_tune,
        }[command](args)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as exc:
        print(f"echomamba {command}: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"echomamba {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"echomamba {command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------------


def _flags(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The command-line flags of `args` named `names` (None: not given)."""
    return {name: getattr(args, name) for name in names}


def cmd_prepare(args: argparse.Namespace) -> int:
    from echomamba_dist.data.prepare import PrepareOptions, format_stats, prepare

    job = load(PrepareConfig, args.config, args.overrides, _flags(
        args, "input", "output", "format", "min_rating", "k_core", "keep_duplicates", "ray", "overwrite"))
    options = PrepareOptions(fmt=job.format, min_rating=job.min_rating, dedup=not job.keep_duplicates, k_core=job.k_core)
    if job.ray:
        from echomamba_dist.distributed.prepare import prepare_on_ray

        meta = prepare_on_ray(job.input, job.output, options, overwrite=job.overwrite)
    else:
        meta = prepare(job.input, job.output, options, overwrite=job.overwrite)
    print(format_stats(meta))
    return 0


MAIN_JOB_CONFIG = Path(__file__).resolve().parent / "configs" / "main.yaml"


def cmd_train(args: argparse.Namespace) -> int:
    # without --config: the main job (packaged config; `--print-config` shows it)
    cfg = load(ExperimentConfig, args.config or MAIN_JOB_CONFIG, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if cfg.train.ray:
        from echomamba_dist.distributed.trainer import fit

        result = fit(cfg)
    else:
        from echomamba_dist.train.loop import train_per_worker

        result = train_per_worker(to_dict(cfg))
    if cfg.tracking.enabled and cfg.tracking.log_model:
        from echomamba_dist.serve.pyfunc import publish_run

        publish_run(cfg)  # the best model, logged and registered (a served champion)
    print(format_result(result, run_dir=cfg.run.run_dir))
    return 0


def format_result(result: dict[str, Any], *, run_dir: Path | None = None) -> str:
    """The end-of-run metrics table: test metrics of the best epoch next to popularity."""
    order = {"hr": 0, "ndcg": 1, "mrr": 2, "recall": 3}  # the same columns through Ray or not
    keys = sorted(result["test"], key=lambda k: (int(k.partition("@")[2] or 0), order.get(k.partition("@")[0], 9), k))
    lines = [
        f"model {result['model']}  run {result['run']}  best epoch {result['best_epoch']}  "
        f"epochs {result['epochs_run']}  test users {result['test_users']}",
        "",
        f"{'':<12}" + "".join(f"{k:>12}" for k in keys),
        f"{'valid':<12}" + "".join(f"{result['valid'].get(k, float('nan')):>12.4f}" for k in keys),
        f"{'test':<12}" + "".join(f"{result['test'][k]:>12.4f}" for k in keys),
        f"{'popularity':<12}" + "".join(f"{result['popularity'].get(k, float('nan')):>12.4f}" for k in keys),
    ]
    if run_dir is not None:
        lines += ["", f"checkpoints and metrics.json in {run_dir}"]
    return "\n".join(lines)


def _check_dataset(loaded, *, n_items: int, fingerprint: str, data_name: str, ignore_fingerprint: bool) -> None:
    """Refuse a dataset other than the checkpoint's: another item count always, other sequences
    (dataset fingerprint) unless `ignore_fingerprint`. Raises CheckpointError."""
    if n_items != int(loaded.meta["n_items"]):
        raise CheckpointError(
            f"{loaded.checkpoint_dir}: trained on {loaded.meta['n_items']} items, but {data_name} has {n_items}"
        )
    trained = loaded.meta.get("dataset_fingerprint")  # absent in checkpoints of old versions
    if trained is not None and trained != fingerprint and not ignore_fingerprint:
        raise CheckpointError(
            f"{loaded.checkpoint_dir}: trained on dataset fingerprint {trained}, but {data_name} has {fingerprint} "
            f"(the same {n_items} items, other sequences); pass --ignore-fingerprint to use it anyway"
        )


def _eval_data(loaded, data_path: str | None, *, ignore_fingerprint: bool = False):
    from echomamba_dist.train.batches import build_training_data

    cfg = loaded.config
    if data_path is not None:
        cfg.data.path = data_path
    data = build_training_data(cfg, cfg.sample_mode, with_samples=False)  # valid/test only
    _check_dataset(loaded, n_items=data.n_items, fingerprint=data.fingerprint,
                   data_name=cfg.data.path or "the synthetic dataset", ignore_fingerprint=ignore_fingerprint)
    return data


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from echomamba_dist.io import check_output_file, write_json_atomic
    from echomamba_dist.serve.load import load_model
    from echomamba_dist.train.evaluate import evaluate_model

    job = load(EvaluateConfig, args.config, args.overrides, _flags(
        args, "checkpoint", "data", "split", "exclude_history", "output", "ignore_fingerprint", "overwrite", "weights"))
    report_file = {"overwrite": job.overwrite, "owned": _is_evaluate_report, "what": "metrics report"}
    if job.output is not None:
        check_output_file(job.output, **report_file)  # before any work
    loaded = load_model(job.checkpoint, best=job.weights == "best")
    data = _eval_data(loaded, job.data, ignore_fingerprint=job.ignore_fingerprint)
    split = data.test if job.split == "test" else data.valid
    with _naming_checkpoint(loaded):
        metrics = evaluate_model(
            loaded.model, split, ks=loaded.config.train.ks, batch_size=loaded.config.train.eval_batch_size,
            device=torch.device("cpu"), exclude_history=job.exclude_history,
        )
    report = {"checkpoint": str(loaded.checkpoint_dir), "split": job.split, "weights": job.weights, **metrics}
    if job.output is not None:
        write_json_atomic(job.output, report, sort_keys=False, **report_file)  # the same text as printed
    print(json.dumps(report, indent=2))
    return 0


def _is_evaluate_report(path: Path) -> bool:
    """Whether `path` is a metrics report `echomamba evaluate --output` wrote (which it may replace)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"checkpoint", "split", "count"} <= set(report)


@contextlib.contextmanager
def _naming_checkpoint(loaded):
    """NonFiniteScores raised inside the block name the checkpoint that scored them."""
    try:
        yield
    except NonFiniteScores as exc:
        raise NonFiniteScores(f"{loaded.checkpoint_dir}: {exc}") from None


def _note(command: str, message: str) -> None:
    """A line on stderr about a result that is not quite what was asked (the command succeeded)."""
    print(f"echomamba {command}: note: {message}", file=sys.stderr)


def cmd_recommend(args: argparse.Namespace) -> int:
    from echomamba_dist.data.dataset import dataset_fingerprint, load_dataset
    from echomamba_dist.serve.load import load_model, pad_histories, topk_items

    flags = _flags(args, "checkpoint", "data", "output", "history", "top_k", "include_history", "ray", "actors", "gpu",
                   "ignore_fingerprint", "overwrite")
    flags["users"] = args.users.split(",") if args.users else None
    job = load(RecommendConfig, args.config, args.overrides, flags)
    if job.output is not None:  # before any work
        from echomamba_dist.io import check_output_dir, check_output_file
        from echomamba_dist.serve.batch import (
            is_recommendations_dir,
            is_recommendations_file,
        )

        if job.ray:
            check_output_dir(job.output, overwrite=job.overwrite, owned=is_recommendations_dir, what="recommendations directory")
        else:
            check_output_file(job.output, overwrite=job.overwrite, owned=is_recommendations_file, what="recommendations file")
    loaded = load_model(job.checkpoint)
    cfg = loaded.config
    if job.data is not None:
        cfg.data.path = job.data
    ds = load_dataset(cfg.data)
    _check_dataset(loaded, n_items=ds.n_items, fingerprint=dataset_fingerprint(ds),
                   data_name=cfg.data.path or "the synthetic dataset", ignore_fingerprint=job.ignore_fingerprint)
    item_ids = [str(x) for x in ds.item_ids]
    if job.history is not None:
        index = {item_ids[i]: i for i in range(1, len(item_ids))}
        tokens = job.history.split()
        unknown = [t for t in tokens if t not in index]
        if unknown or not tokens:
            raise DataError(f"history: unknown item id(s) {unknown[:5]} (expected original ids of the dataset)" if unknown else "history: empty")
        seq, seq_len = pad_histories([[index[t] for t in tokens]], cfg.data.max_len)
        with _naming_checkpoint(loaded):
            top, scores = topk_items(loaded.model, seq, seq_len, k=job.top_k, exclude_history=not job.include_history)
        found = [(i, s) for i, s in zip(top[0], scores[0]) if i > 0]
        for r, (i, s) in enumerate(found, start=1):
            print(f"{r:3d}  {item_ids[i]}  {s:.4f}")
        if len(found) < job.top_k:
            seen = f", less the {ds.n_items - len(found)} in the history" if not job.include_history else ""
            _note("recommend", f"returned {len(found)} of {job.top_k} items: the dataset has {ds.n_items} items{seen}")
        return 0
    from echomamba_dist.serve.batch import (
        available_items,
        recommend_users,
        write_recommendations,
    )

    def note_short(users) -> None:
        short = available_items(ds, users, max_len=cfg.data.max_len, exclude_history=not job.include_history) < job.top_k
        if short.any():
            seen = ", less those in their history" if not job.include_history else ""
            _note("recommend", f"{int(short.sum())} of {len(users)} users got fewer than {job.top_k} items: "
                               f"the dataset has {ds.n_items} items{seen}")

    if job.ray:
        from echomamba_dist.distributed.recommend import recommend_on_ray

        with _naming_checkpoint(loaded):
            n = recommend_on_ray(
                loaded.checkpoint_dir, ds, job.output, k=job.top_k, exclude_history=not job.include_history,
                num_actors=job.actors, use_gpu=job.gpu, overwrite=job.overwrite,
            )
        print(f"wrote top-{job.top_k} recommendations for {n} users to {job.output}/ (Ray Data, {job.actors} actors)")
        import numpy as np

        note_short(np.flatnonzero(np.diff(ds.offsets) > 0))  # the users it scored
        return 0

    user_ids = [str(u) for u in ds.user_ids]
    if job.users is not None:
        pos = {u: i for i, u in enumerate(user_ids)}
        missing = [u for u in job.users if u not in pos]
        if missing:
            raise DataError(f"users: unknown user id(s) {missing[:5]}")
        users = [pos[u] for u in job.users]
    else:
        users = list(range(len(user_ids)))
    with _naming_checkpoint(loaded):
        table = recommend_users(loaded, ds, users, k=job.top_k, exclude_history=not job.include_history)
    write_recommendations(table, job.output, overwrite=job.overwrite)
    print(f"wrote top-{job.top_k} recommendations for {len(users)} users to {job.output}")
    note_short(users)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from echomamba_dist.models.registry import list_models

    rows = list_models()
    print(f"{'model':<22}{'trains on':<16}{'parameters':>12}")
    for row in rows:
        name, mode, n_params = row[0], row[1], row[2]
        print(f"{name:<22}{mode:<16}{n_params:>12,}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from echomamba_dist.distributed.tune.driver import run_study

    run_study(args.config, args.overrides, retry_failed=args.retry_failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
