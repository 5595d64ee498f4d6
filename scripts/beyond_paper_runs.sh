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
#    waits first for a study process already running with that study file
# 2. benchmarks/study_report.py -> docs/results/tune-beauty-cpu/ (best.yaml once the study ended)
# 3. two lanes side by side, one thread each:
#      lane 1: the tuned EchoMamba4Rec x seeds on Beauty; BERT4Rec with RecBole's prefix rows;
#              the tuned EchoMamba4Rec x seeds on Video-Games
#      lane 2: SASRec and Bi-Mamba4Rec x seeds on Beauty (paper settings); SASRec x seeds on Video-Games
# 4. the tables: benchmarks/seeds.py --report-only -> docs/results/seeds-beauty.{json,md} and
#    docs/results/seeds-video-games.{json,md}
#
# Environment: RUNS (run directories and logs, outside the repository; default ../runs beside
# the checkout), STUDY_SRC (the checkout the study runs from: a study resumes only with the code
# that started it; default this checkout), SEEDS (default "1 2 3"), PYTHON, MLFLOW_TRACKING_URI
# (default sqlite in RUNS).
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
  "$@" >> "$RUNS/$log" 2>&1
}

seeds() {  # seeds DATA RUNS_SUBDIR OUT_STEM [--config ...]: benchmarks/seeds.py for these configs
  local data="$1" sub="$2" out="$3"; shift 3
  # shellcheck disable=SC2086
  step "$sub.log" "$PY" benchmarks/seeds.py --seeds $SEEDS --set "data.path=$data" \
    --runs "$RUNS/seeds/$sub" --out "$RUNS/seeds/$sub-$out.json" --dataset-name "amazon-$sub" "$@"
}

cd "$ROOT"
[[ -d "$BEAUTY" ]] || step prepare.log "$PY" -m echomamba_dist.cli prepare --input ../shared/data/amazon-beauty.txt --output "$BEAUTY"
[[ -d "$GAMES" ]] || step prepare.log "$PY" -m echomamba_dist.cli prepare --input ../shared/data/amazon-video-games.txt --output "$GAMES"

# 1. The search.
if [[ ! -f "$STUDY/results.parquet" ]]; then
  while [[ $DRY_RUN == 0 ]] && pgrep -f "tune --config $STUDY_FILE" > /dev/null; do sleep 60; done
  if [[ ! -f "$STUDY/results.parquet" ]]; then
    (cd "$STUDY_SRC" && PYTHONPATH="$STUDY_SRC" step tune.log "$PY" -m echomamba_dist.cli tune --config "$STUDY_FILE" \
      --set "data.path=$ROOT/$BEAUTY" --set "run.storage_path=$RUNS" --set "tune.storage_path=$RUNS/tune")
  fi
fi
# 2. Its report, and best.yaml into docs/results/.
step study-report.log "$PY" benchmarks/study_report.py --study-config "$STUDY_FILE" --study "$STUDY" \
  --out "$RESULTS/tune-beauty-cpu"
[[ $DRY_RUN == 1 || -f "$BEST" ]] || { echo "no $BEST: the study has not ended" >&2; exit 1; }

# 3. Two lanes.
# The tuned config trains with the baselines' stopping rule (the paper's: at most 300 epochs,
# patience 10), not the study's shorter one (60, 5).
TUNED=(--config "echomamba4rec-tuned=$BEST" --set train.epochs=300 --set train.patience=10)
(
  seeds "$BEAUTY" beauty lane1 "${TUNED[@]}"
  step bert4rec.log "$PY" -m echomamba_dist.cli train --config jobs/configs/beauty-bert4rec-prefix.yaml \
    --set train.ray=false --set "data.path=$BEAUTY" --set "run.storage_path=$RUNS"
  seeds "$GAMES" video-games lane1 "${TUNED[@]}"
) &
LANE1=$!
(
  seeds "$BEAUTY" beauty lane2 --config sasrec=jobs/configs/beauty-sasrec.yaml \
    --config bimamba4rec=jobs/configs/beauty-bimamba4rec.yaml
  seeds "$GAMES" video-games lane2 --config sasrec=jobs/configs/beauty-sasrec.yaml
) &
LANE2=$!
wait "$LANE1"
wait "$LANE2"

# 4. The tables, from the finished runs (the baselines' configs already hold TUNED's stopping rule).
# shellcheck disable=SC2086
step report.log "$PY" benchmarks/seeds.py --report-only --seeds $SEEDS --set "data.path=$BEAUTY" \
  --runs "$RUNS/seeds/beauty" --dataset-name amazon-beauty --out "$RESULTS/seeds-beauty.json" \
  "${TUNED[@]}" --config sasrec=jobs/configs/beauty-sasrec.yaml \
  --config bimamba4rec=jobs/configs/beauty-bimamba4rec.yaml
# shellcheck disable=SC2086
step report.log "$PY" benchmarks/seeds.py --report-only --seeds $SEEDS --set "data.path=$GAMES" \
  --runs "$RUNS/seeds/video-games" --dataset-name amazon-video-games --out "$RESULTS/seeds-video-games.json" \
  "${TUNED[@]}" --config sasrec=jobs/configs/beauty-sasrec.yaml
