#!/usr/bin/env bash
# testbed on Flower's deployment engine, all on this machine over loopback: one SuperLink,
# one SuperNode per site (each its own process, with its own partition-id and data root),
# and `flwr run` submitting the testbed Flower App (deploy/flower-app). See docs/flower.md.
#
#   scripts/flower_loopback.sh [SCENARIO] [OUT]
#
# SCENARIO defaults to scenarios/quickstart.toml, OUT to reports/flower-loopback-<time>.
# Env: BIN (folder with python, flwr, flower-superlink, flower-supernode; default .venv/bin),
# PORT (SuperLink's HTTP port, default 19200; SuperNodes use PORT+1..PORT+N),
# SET (";"-separated KEY=VALUE overrides), DATA_ROOT (every site's data root),
# TIMEOUT_S (default 1800). Exits 0 when the run folder holds metrics.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${BIN:-.venv/bin}")
export PATH="$BIN:$PATH"  # the SuperLink and SuperNodes start flower-superexec and friends
SCENARIO=$(realpath "${1:-scenarios/quickstart.toml}")
OUT=$(realpath -m "${2:-reports/flower-loopback-$(date +%Y%m%d-%H%M%S)}")
PORT=${PORT:-19200}
TIMEOUT_S=${TIMEOUT_S:-1800}
SITES=$("$BIN/python" -c "
import sys
from testbed.pluginmanager import build_host
from testbed.problems import ScenarioError
from testbed.scenario_load import load_scenario
overrides = [s for s in sys.argv[2].split(';') if s]
try:
    print(load_scenario(sys.argv[1], build_host().registry, overrides).federation.clients)
except ScenarioError as exc:
    sys.exit(f'error: {exc}')
" "$SCENARIO" "${SET:-}") || exit 2

WORK=$(mktemp -d)
export FLWR_HOME="$WORK/flwr"
mkdir -p "$FLWR_HOME" "$WORK/logs"
cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$PORT"
insecure = true
TOML

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "SuperLink on 127.0.0.1:$PORT, $SITES SuperNodes; logs in $WORK/logs"
"$BIN/flower-superlink" --insecure --host 127.0.0.1 --port "$PORT" \
  --database "$WORK/state.db" >"$WORK/logs/superlink.log" 2>&1 &
pids+=($!)
for ((i = 0; i < SITES; i++)); do
  cfg="partition-id=$i"
  [[ -n "${DATA_ROOT:-}" ]] && cfg="$cfg data-root=\"$DATA_ROOT\""
  "$BIN/flower-supernode" --insecure --superlink "127.0.0.1:$PORT" \
    --port $((PORT + 1 + i)) --node-config "$cfg" >"$WORK/logs/supernode$i.log" 2>&1 &
  pids+=($!)
done

alive() {  # every Flower process still running? else show its log and fail
  local names=(superlink) i
  for ((i = 0; i < SITES; i++)); do names+=("supernode$i"); done
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "${names[$i]} exited; its log:" >&2
      tail -n 20 "$WORK/logs/${names[$i]}.log" >&2
      exit 1
    fi
  done
}

run_config="scenario=\"$SCENARIO\" out=\"$OUT\" set=\"${SET:-}\""
[[ -n "${DATA_ROOT:-}" ]] && run_config="$run_config data-root=\"$DATA_ROOT\""
submitted=0
for _ in $(seq 60); do  # the SuperLink takes a few seconds to listen
  alive
  if "$BIN/flwr" run deploy/flower-app loopback --run-config "$run_config" \
    >"$WORK/logs/flwr-run.log" 2>&1; then
    submitted=1
    break
  fi
  sleep 1
done
cat "$WORK/logs/flwr-run.log"
((submitted)) || { echo "flwr run could not submit the app" >&2; exit 1; }
RUN_ID=$(grep -oE 'started run [0-9]+' "$WORK/logs/flwr-run.log" | grep -oE '[0-9]+$')

deadline=$((SECONDS + TIMEOUT_S))
until [[ -f "$OUT/metrics.json" ]]; do
  alive
  if "$BIN/flwr" ls loopback --run-id "$RUN_ID" --format json 2>/dev/null | grep -q failed; then
    echo "run $RUN_ID failed; its log:" >&2
    timeout 20 "$BIN/flwr" log "$RUN_ID" loopback --show >&2 || true
    exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "no metrics.json in $OUT after ${TIMEOUT_S} s; last SuperLink log lines:" >&2
    tail -n 30 "$WORK/logs/superlink.log" >&2
    exit 1
  fi
  sleep 2
done
echo "run complete: $OUT"
