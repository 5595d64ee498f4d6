"""The CLI's bad-input table (issue 14): each row is a command a careless user might type, the
exit status it must end with, and a phrase of its one-line message; `run_case` also checks that
files that existed before are byte-identical afterwards and that nothing partial is left."""

from __future__ import annotations

import pytest
from cli_harness import TINY_TRAIN, Case, run_case

CASES = [
    Case("prepare-missing-input", ("prepare", "--input", "{ws}/absent.csv", "--output", "{ws}/out", "--no-ray"),
         2, r"absent\.csv: no such file"),
    Case("prepare-existing-output", ("prepare", "--input", "{ws}/log.csv", "--output", "{ws}/prepared", "--no-ray"),
         2, r"prepared: output directory exists"),
    Case("train-unknown-key", ("train", *TINY_TRAIN, "--set", "train.nope=1"), 2, r"train\.nope"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, workspace, tmp_path, capsys):
    run_case(case, workspace, tmp_path, capsys)
