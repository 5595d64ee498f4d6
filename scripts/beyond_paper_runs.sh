#!/usr/bin/env bash
# The long CPU runs of docs/beyond-the-paper.md, in order, never more than two one-thread
# processes at a time. Every step resumes where it stopped (the study by its name, each training
# run by its run name, finished runs are reused), so after an interruption run the same command
# again; a step already done costs a few seconds.
#
#   scripts/beyond_paper_runs.sh            # run (hours to days on a 2-core CPU)
#   scripts/beyond_paper_runs.sh --dry-run  # print the steps, run nothing
#
# 1. the search: echomamba tune with jobs/configs/tune-beauty-cpu.yaml (two trials at a time);
#    waits first for a study process already running with that study file; skipped once the
#    search has ended (docs/results/tune-beauty-cpu/best.yaml is there)
# 2. benchmarks/study_report.py -> docs/results/tune-beauty-cpu/ (best.yaml once the study ended);
#    only where the study directory is (RUNS/tune)
# 3. two workers side by side, one thread each, sharing the training runs (benchmarks/seeds.py skips
#    a run whose directory the other worker's trainer has locked and takes the next one), in order:
#    Beauty: the tuned EchoMamba4Rec, SASRec and Bi-Mamba4Rec (paper settings) x seeds; BERT4Rec
#    with RecBole's prefix rows (the first seed); Video-Games: the tuned EchoMamba4Rec and SASRec x seeds;
#    each finished run's record is kept in docs/results/seeded-runs/ (commit it: a run recorded there
#    is not trained again, on this machine or another)
# 4. the tables: benchmarks/seeds.py --report-only -> docs/results/seeds-beauty.{json,md},
#    docs/results/bert4rec-prefix-beauty.{json,md} and docs/results/seeds-video-games.{json,md}
#
# Environment: RUNS (run directories and logs, outside the repository; default ../runs beside
# the checkout), STUDY_SRC (the checkout the study runs from: a study resumes only with the code
# that started it; default this checkout), SEEDS (default "1 2 3"), PYTHON, MLFLOW_TRACKING_URI
# (default sqlite in RUNS), DEADLINE (on a machine lent for a fixed time: the workers start no run
# expected to end after it, benchmarks/seeds.py --deadline; e.g. DEADLINE=17:00, UTC).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
RUNS="$(mkdir -p "${RUNS:-$ROOT/../runs}" && cd "${RUNS:-$ROOT/../runs}" && pwd)"
STUDY_SRC="${STUDY_SRC:-$ROOT}"
SEEDS="${SEEDS:-1 2 3}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$RUNS/mlflow.db}"

# Paths in the repository are relative (the steps run in it, and the reports show them as given).
BEAUTY=prepared/amazon-beauty
GAMES=prepared/amazon-video-games
STUDY_FILE=jobs/configs/tune-beauty-cpu.yaml
STUDY="$RUNS/tune/beauty-echomamba4rec-cpu"
RESULTS=docs/results
BEST="$RESULTS/tune-beauty-cpu/best.yaml"

step() {  # step LOG COMMAND...: run (or print) one step, its output appended to RUNS/LOG
  local log="$1"; shift
  if [[ $DRY_RUN == 1 ]]; then echo "$*"; return; fi
  echo "[$(date -u +%FT%TZ)] $*" | tee -a "$RUNS/$log"
  local rc=0
  "$@" >> "$RUNS/$log" 2>&1 || rc=$?
  if [[ $rc != 0 ]]; then  # said where the step was started (the worker stops; the script exits non-zero)
    echo "[$(date -u +%FT%TZ)] failed (exit $rc), its output in $RUNS/$log: $1 ${2:-} ..." | tee -a "$RUNS/$log" >&2
  fi
  return "$rc"
}

seeds_py() {  # seeds_py LOG SEEDS DATA RUNS_SUBDIR OUT [ARGS...]: benchmarks/seeds.py, runs in RUNS/seeds/RUNS_SUBDIR
  local log="$1" seeds="$2" data="$3" sub="$4" out="$5"; shift 5
  # Finished runs' records go to docs/results/seeded-runs/ (committed): on a machine without these
  # run directories, the runs they hold are not trained again.
  # shellcheck disable=SC2086
  step "$log" "$PY" benchmarks/seeds.py --seeds $seeds --set "data.path=$data" \
    --runs "$RUNS/seeds/$sub" --archive "$RESULTS/seeded-runs/$sub" --dataset-name "amazon-$sub" --out "$out" "$@"
}
seeds() {  # seeds SEEDS DATA RUNS_SUBDIR STEM [--config ...]: train these configs x SEEDS (report in RUNS)
  seeds_py "$3-$4.log" "$1" "$2" "$3" "$RUNS/seeds/$3-$4.json" "${@:5}" ${DEADLINE:+--deadline "$DEADLINE"}
}

cd "$ROOT"
[[ -d "$BEAUTY" ]] || step prepare.log "$PY" -m echomamba_dist.cli prepare --input ../shared/data/amazon-beauty.txt --output "$BEAUTY"
[[ -d "$GAMES" ]] || step prepare.log "$PY" -m echomamba_dist.cli prepare --input ../shared/data/amazon-video-games.txt --output "$GAMES"

# 1. The search (skipped once its best.yaml is in docs/results: the study ended, perhaps on another
# machine whose study directory is not here).
if [[ ! -f "$BEST" && ! -f "$STUDY/results.parquet" ]]; then
  while [[ $DRY_RUN == 0 ]] && pgrep -f "tune --config $STUDY_FILE" > /dev/null; do sleep 60; done
  if [[ ! -f "$STUDY/results.parquet" ]]; then
    (cd "$STUDY_SRC" && PYTHONPATH="$STUDY_SRC" step tune.log "$PY" -m echomamba_dist.cli tune --config "$STUDY_FILE" \
      --set "data.path=$ROOT/$BEAUTY" --set "run.storage_path=$RUNS" --set "tune.storage_path=$RUNS/tune")
  fi
fi
# 2. Its report, and best.yaml into docs/results/ (from the study directory, where it is here).
if [[ -d "$STUDY" ]] || [[ $DRY_RUN == 1 && ! -f "$BEST" ]]; then
  step study-report.log "$PY" benchmarks/study_report.py --study-config "$STUDY_FILE" --study "$STUDY" \
    --out "$RESULTS/tune-beauty-cpu"
fi
[[ $DRY_RUN == 1 || -f "$BEST" ]] || { echo "no $BEST: the study has not ended" >&2; exit 1; }

# 3. Two workers, one thread each, given the same runs in the same order. A trainer locks its run
# directory and benchmarks/seeds.py skips a locked run, so each worker takes the next run the other
# does not hold:
# Beauty (the tuned EchoMamba4Rec, SASRec, Bi-Mamba4Rec x seeds), BERT4Rec with RecBole's prefix
# rows (one seed), Video-Games (the tuned EchoMamba4Rec, SASRec x seeds).
# The tuned config trains with the baselines' stopping rule (the paper's: at most 300 epochs,
# patience 10), not the study's shorter one (60, 5).
TUNED=(--config "echomamba4rec-tuned=$BEST" --set train.epochs=300 --set train.patience=10)
BEAUTY_CONFIGS=("${TUNED[@]}" --config sasrec=jobs/configs/beauty-sasrec.yaml
                --config bimamba4rec=jobs/configs/beauty-bimamba4rec.yaml)
GAMES_CONFIGS=("${TUNED[@]}" --config sasrec=jobs/configs/beauty-sasrec.yaml)
BERT=(--config bert4rec-prefix=jobs/configs/beauty-bert4rec-prefix.yaml)
BERT_SEEDS="${SEEDS%% *}"  # BERT4Rec: the first seed only
worker() {  # worker N: every run in order, skipping those the other worker holds
  seeds "$SEEDS" "$BEAUTY" beauty "worker$1" "${BEAUTY_CONFIGS[@]}"
  seeds "$BERT_SEEDS" "$BEAUTY" beauty "bert4rec-worker$1" "${BERT[@]}"
  seeds "$SEEDS" "$GAMES" video-games "worker$1" "${GAMES_CONFIGS[@]}"
}
if [[ $DRY_RUN == 1 ]]; then
  worker 1; worker 2
else
  worker 1 & W1=$!
  worker 2 & W2=$!
  wait "$W1"
  wait "$W2"
fi

# 4. The tables, from the finished runs (the baselines' configs already hold TUNED's stopping rule).
report() {  # report SEEDS DATA RUNS_SUBDIR OUT [--config ...]: the table of the finished runs
  seeds_py report.log "$1" "$2" "$3" "$4" --report-only "${@:5}"
}
report "$SEEDS" "$BEAUTY" beauty "$RESULTS/seeds-beauty.json" "${BEAUTY_CONFIGS[@]}"
report "$BERT_SEEDS" "$BEAUTY" beauty "$RESULTS/bert4rec-prefix-beauty.json" "${BERT[@]}"
report "$SEEDS" "$GAMES" video-games "$RESULTS/seeds-video-games.json" "${GAMES_CONFIGS[@]}"
