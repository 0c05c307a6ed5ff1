#!/usr/bin/env bash
# The seed paper's whole experiment and the sensitivity study of issue 14, on one GPU:
#
#   scripts/reproduce_paper.sh [OUT]          # DATA_ROOT=../shared/datasets by default
#
# 1. paper_baseline.toml at the full schedule (50 rounds x 20 local epochs, 3 clients),
#    all three tasks, 3 seeds, one run per task and seed, JOBS of them at once: Tables I/II
#    with mean and 95% CI (scripts/paper_table.py).
# 2. paper_sweeps.toml on the real data: Fig. 2 (eps) and Fig. 3 (clients).
# 3. Sensitivity over what the paper leaves open, on the meningioma task, 3 seeds each:
#    the downlink noise multiplier z, each with eps on [0, 1] pixels and after
#    normalisation (eps x the data's std), and the number of non-IID chunks per client.
#    Every run also reports ASR against the true label beside the paper's (against the
#    clean prediction), and how far apart the deployed client models are.
# 4. Step 3's closest setting (z = 0.002, eps after normalisation by each task's own pixel
#    std) on all three tasks, 3 seeds: does what comes closest on meningioma carry over?
#
# Env: DATA_ROOT, DEVICE (default cuda), ENGINE (default inprocess; "batched" stacks the
# clients where the model has no dropout), DROPOUT (with ENGINE=batched: "exact", the
# default, or "stacked" to batch the paper CNN's dropout too: the same training in
# distribution, not in-process numbers), CAPTURE (with ENGINE=inprocess: "cuda-graph"
# replays local training as one captured CUDA graph per run; not bitwise the eager run's
# numbers, its own cache entries), BIN (default .venv/bin), STEPS ("1 2 3 4"),
# SENSITIVITY (steps 3 and 4's base scenario, default paper_baseline.toml; on CPU,
# scenarios/sensitivity_cpu.toml: the same at 5 rounds x 4 local epochs, one seed),
# SEEDS and TASKS (steps 1 and 4's, default "0 1 2" and all three tasks), JOBS (step 1's
# runs at once; default 3 on a GPU, where the paper CNN at batch 32 leaves room for three
# processes, and 1 on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${BIN:-.venv/bin}")
OUT=$(realpath -m "${1:-reports/reproduce-$(date +%Y%m%d-%H%M%S)}")
DATA_ROOT=$(realpath "${DATA_ROOT:-../shared/datasets}")
DEVICE=${DEVICE:-cuda}
ENGINE=${ENGINE:-inprocess}
ENGINE_SETS=(--set "engine.name=$ENGINE")
[[ -n "${DROPOUT:-}" ]] && ENGINE_SETS+=(--set "engine.params.dropout=$DROPOUT")
[[ -n "${CAPTURE:-}" ]] && ENGINE_SETS+=(--set "engine.params.capture=$CAPTURE")
STEPS=${STEPS:-1 2 3 4}
SEEDS=${SEEDS:-0 1 2}                        # steps 1 and 4
TASKS=${TASKS:-meningioma glioma pathology}  # steps 1 and 4
JOBS=${JOBS:-$([[ $DEVICE == cpu ]] && echo 1 || echo 3)}
SENSITIVITY=${SENSITIVITY:-scenarios/paper_baseline.toml}

# Expected time, before anything runs. Measured on H200s (docs/BENCHMARKS.md): a
# meningioma task-seed alone takes 210-237 s (3.4-3.9 s per round, then ~25 s of attacks
# and explanations); three at once 421-447 s each (glioma, pathology), 1.7x the
# throughput, and six at once no more than three. On 2 CPU cores ~6 h per task-seed
# (../shared/reference/BASELINES.md).
cat <<EOF
reproduce_paper: device $DEVICE, engine $ENGINE ${DROPOUT:+(dropout $DROPOUT)}${CAPTURE:+(capture $CAPTURE)}, $JOBS run(s) at once in step 1, data $DATA_ROOT, output $OUT
expected on one H200: step 1 ~23 min (3 tasks x 3 seeds, three at once: 7-7.5 min per
task, measured), step 2 ~30 min, step 3 ~2 h (14 settings x 3 seeds on meningioma; 8
train, 6 attack a cached federation), step 4 ~30 min (9 task-seeds; meningioma's
federations are step 3's, from the cache); on 2 CPU
cores: days. Steps 3 and 4 with SENSITIVITY=scenarios/sensitivity_cpu.toml on 2 CPU cores
(measured): ~13 min per trained setting, ~7 min per cached one, about 2.5 h for step 3;
~17 min per task-seed for step 4.
EOF

run() {  # run NAME SCENARIO [testbed run args...]
  local name=$1 scenario=$2
  shift 2
  if [[ -f "$OUT/$name/metrics.json" ]]; then echo "done: $name"; return; fi
  if [[ -d "$OUT/.$name.partial" ]]; then  # a resume takes the run's own scenario and device
    echo "== $name, resumed ($(date +%H:%M:%S))"
    "$BIN/testbed" run --resume "$OUT/$name" --data-root "$DATA_ROOT"
    return
  fi
  echo "== $name ($(date +%H:%M:%S))"
  "$BIN/testbed" run "$scenario" --data-root "$DATA_ROOT" --device "$DEVICE" \
    "${ENGINE_SETS[@]}" --out "$OUT/$name" "$@"
}

# eps after normalisation: the scenario's eps and eps_step (the paper's 0.03 and 0.007)
# times the task's pixel std, one std over all pixels and channels, from the task's data
# as the scenario loads it
declare -A STD_OF  # measured once per task
eps_normalised() {  # eps_normalised TASK: sets SETS for the four attacks
  [[ -n "${STD_OF[$1]:-}" ]] || STD_OF[$1]=$("$BIN/python" - "$SENSITIVITY" "$1" "$DATA_ROOT" <<'PY'
import sys
from pathlib import Path
from testbed.pluginmanager import build_host
from testbed.scenario_load import load_scenario
host = build_host()
task = next(t for t in load_scenario(Path(sys.argv[1]), host.registry).task_list()
            if t.name == sys.argv[2])
ds = host.registry.build("datasets", task.data.name, task.data.params, data_root=Path(sys.argv[3]))
print(f"{float(ds.x.float().div(255).std()):.6f}")
PY
)
  local std=${STD_OF[$1]}
  # the scenario's own eps and eps_step, scaled (scripts/closest_sweeps.py, as for Fig. 3)
  mapfile -t SETS < <("$BIN/python" scripts/closest_sweeps.py "$1" "$std" \
    --scenario "$SENSITIVITY" --attack-sets)
  (( ${#SETS[@]} )) || { echo "no eps to scale in $SENSITIVITY" >&2; exit 2; }
  local values=() i
  for ((i = 1; i < ${#SETS[@]}; i += 2)); do values+=("${SETS[i]}"); done
  echo "$1 pixel std $std, on [0, 1] pixels: ${values[*]}"
}

mkdir -p "$OUT"
MEN=(--task meningioma)
for step in $STEPS; do
  case $step in
    1)
      # one run per task and seed, so that JOBS of them share the GPU and each lands alone
      names=()
      for seed in $SEEDS; do
        for task in $TASKS; do
          name="baseline-$task-seed$seed"
          names+=("$name")
          [[ -f "$OUT/$name/metrics.json" ]] && { echo "done: $name"; continue; }
          while (($(jobs -rp | wc -l) >= JOBS)); do wait -n || true; done
          echo "== $name started ($(date +%H:%M:%S)), log $OUT/$name.out"
          run "$name" scenarios/paper_baseline.toml --task "$task" --no-progress \
            --set "evaluation.repeats=1" --set "evaluation.seeds=[$seed]" >"$OUT/$name.out" 2>&1 &
        done
      done
      wait
      missing=()
      for name in "${names[@]}"; do
        [[ -f "$OUT/$name/metrics.json" ]] || missing+=("$name")
      done
      if ((${#missing[@]})); then
        echo "step 1: ${missing[*]} did not finish (see their .out); rerun to resume them" >&2
        exit 1
      fi
      "$BIN/python" scripts/paper_table.py "${names[@]/#/$OUT/}" | tee "$OUT/baseline-table.md"
      ;;
    2) run sweeps scenarios/paper_sweeps.toml ;;
    3)
      eps_normalised meningioma
      # both eps readings at every z: the second run of a pair trains nothing (the cache)
      for z in 0 0.0005 0.002 0.005 0.05; do
        run "z-$z" "$SENSITIVITY" "${MEN[@]}" --set "dp.params.noise_multiplier=$z"
        run "z-$z-eps-normalised" "$SENSITIVITY" "${MEN[@]}" \
          --set "dp.params.noise_multiplier=$z" "${SETS[@]}"
      done
      for chunks in 1 2 5 10; do
        run "chunks-$chunks" "$SENSITIVITY" "${MEN[@]}" \
          --set "partition.params.chunks_per_client=$chunks"
      done
      ;;
    4)
      # step 3's closest setting on every task, one run per seed so that a long CPU run
      # has every task on one seed before any on two
      for seed in $SEEDS; do
        for task in $TASKS; do
          eps_normalised "$task"
          run "closest-$task-seed$seed" "$SENSITIVITY" --task "$task" \
            --set "dp.params.noise_multiplier=0.002" "${SETS[@]}" \
            --set "evaluation.repeats=1" --set "evaluation.seeds=[$seed]"
        done
      done
      ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
echo "all runs in $OUT; tables: $BIN/testbed report $OUT/<run>"
