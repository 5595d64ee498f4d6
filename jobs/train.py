"""`ray job submit --working-dir . -- python jobs/train.py ...`: the same as `echomamba train ...`."""

from _common import run

if __name__ == "__main__":
    run("train")
