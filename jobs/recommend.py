"""`ray job submit --working-dir . -- python jobs/recommend.py ...`: the same as `echomamba recommend ...`."""

from _common import run

if __name__ == "__main__":
    run("recommend")
