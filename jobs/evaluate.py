"""`ray job submit --working-dir . -- python jobs/evaluate.py ...`: the same as `echomamba evaluate ...`."""

from _common import run

if __name__ == "__main__":
    run("evaluate")
