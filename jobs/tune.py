"""`ray job submit --working-dir . -- python jobs/tune.py ...`: the same as `echomamba tune ...`."""

from _common import run

if __name__ == "__main__":
    run("tune")
