#!/usr/bin/env bash
# Packs what one short GPU lease needs into .lease/ (git-ignored), for a machine that
# cannot reach a package index and receives at most 64 MiB:
#
#   scripts/lease/pack.sh [TASK...]     # default: meningioma glioma
#
# - .lease/whl: wheels the lent machine's image lacks (cp312, manylinux), and testbed's own;
# - .lease/cache: each task's decoded dataset (testbed's own cache payload, xz), with
#   .lease/stamps.json: the names, sizes and mtimes of the source files that key it (with
#   TESTBED_DATA_KEY=stamps; by default the loaders key by content) and a
#   checksum of the images. full_schedule.py recreates the images there as empty sparse
#   files so the loader finds its cache under the same key; the other files (label lists,
#   which a loader reads before it looks in its cache) travel whole in .lease/files. The
#   check below and the one there compare the images themselves, so a mismatch stops the
#   lease before any run.
# PCam's decoded 2150 patches (49 MB compressed) do not fit beside the MRI tasks: pack
# `pathology` alone (the 2026-12-04 lease: 54 MB with the wheels, under the 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
TASKS=${*:-meningioma glioma}
DATA_ROOT=$(realpath "${DATA_ROOT:-../shared/datasets}")
rm -rf .lease && mkdir -p .lease/whl .lease/cache .lease/files
py312=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64)
# the versions this checkout's environment resolved, so both machines run the same ones
pins=()
for pkg in pydantic pydantic_core typing-inspection annotated-types typing_extensions \
           adversarial-robustness-toolbox opacus captum dill pluggy rich; do
  pins+=("$pkg==$("$BIN/pip" show "$pkg" | awk '/^Version/{print $2}')")
done
python3 -m pip download -q "${py312[@]}" -d .lease/whl "${pins[@]}"
"$BIN/pip" wheel -q --no-deps --no-build-isolation -w .lease/whl .
# keyed by mtime (TESTBED_DATA_KEY=stamps), as the lent machine's stand-ins will key them
TESTBED_CACHE_DIR=$PWD/.lease/cache-raw TESTBED_DATA_KEY=stamps \
  "$BIN/python" - "$DATA_ROOT" $TASKS <<'PY'
import json, shutil, sys
from pathlib import Path

sys.path.insert(0, "scripts/lease")
from full_schedule import task_signatures

IMAGES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
root, tasks = Path(sys.argv[1]), sys.argv[2:]
sigs = task_signatures(Path("scenarios/paper_baseline.toml"), root, tasks)
if set(tasks) - set(sigs):
    sys.exit(f"no such task in paper_baseline.toml: {sorted(set(tasks) - set(sigs))}")
out = {"data_root": str(root), "tasks": sigs, "files": []}
folders = {s["folder"] for s in sigs.values()}
for folder in sorted(folders):
    for f in sorted((root / folder).rglob("*")):
        if f.is_file():
            st = f.stat()
            rel = f.relative_to(root).as_posix()
            out["files"].append([rel, st.st_size, st.st_mtime_ns])
            if f.suffix.lower() not in IMAGES:  # label lists are read before the cache lookup
                (Path(".lease/files") / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, Path(".lease/files") / rel)
Path(".lease/stamps.json").write_text(json.dumps(out))
print(f"{len(out['files'])} stamped files; tasks {out['tasks']}")
PY
for f in .lease/cache-raw/*.pt; do xz -T2 -6 -c "$f" > ".lease/cache/$(basename "$f").xz"; done
rm -rf .lease/cache-raw
du -sh .lease/whl .lease/cache .lease/files
