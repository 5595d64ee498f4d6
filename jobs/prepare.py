"""`ray job submit --working-dir . -- python jobs/prepare.py ...`: the same as `echomamba prepare ...`."""

from _common import run

if __name__ == "__main__":
    run("prepare")
