"""paper_baseline at the full schedule on one lent GPU, inside one call's deadline.

    python3 scripts/lease/full_schedule.py --install --bench     # there, after pack.sh here

A lease is a few minutes of one GPU, in one call of at most 10 minutes, on a machine with
no package index and none of ../shared. This driver:

1. installs the carried wheels (.lease/whl) into /tmp/site;
2. restores the data pack.sh made: the decoded datasets into the testbed cache, the
   source images that key them as empty sparse files of the recorded names, sizes and
   mtimes (``TESTBED_DATA_KEY=stamps``: keyed by mtime, not content), and the label
   lists whole (never over a real file that differs); then loads every task through the
   real loader and compares shape, pixel sum and label count with what pack.sh
   recorded, and stops before any run if one differs;
3. with --bench, runs the captured step's GPU tests (tests/test_captured.py), times the
   engines' training step on the GPU (benchmarks/test_engine_step.py, BENCH_DEVICE=cuda:
   eager and captured, each with and without augmentation, stacked) and the step's faster
   variants (benchmarks/step_variants.py: cudnn.benchmark, channels-last, bf16, CUDA
   graph); with ``--set engine.params.capture=cuda-graph`` the runs replay the captured
   step;
4. runs one `testbed run` per task and seed at once (a paper CNN at batch 32 leaves an
   H200 mostly idle, so concurrent processes share it) and watches each run's log: once
   every run has three rounds, a run predicted to end after the deadline costs the others
   their share of the GPU, so the lowest in priority (later seeds first) is stopped, one
   at a time; at the deadline whatever still runs is stopped and its log kept;
5. packs every finished run's metrics.json, run.log, report.md and scenario.json, the
   stopped runs' logs, and this driver's log into $OUT/results.tar.gz.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LEASE = REPO / ".lease"
SITE = Path("/tmp/site")
ROUND_LINE = re.compile(r"^(\S+ \S+) INFO .* round (\d+): ")

_T0 = time.monotonic()


def say(msg: str, log: Path | None = None) -> None:
    line = f"[{time.monotonic() - _T0:6.1f} s] {msg}"
    print(line, flush=True)
    if log is not None:
        with log.open("a") as fh:
            fh.write(line + "\n")


@dataclass
class Run:
    task: str
    seed: int
    priority: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    state: str = "pending"  # pending, running, done, failed, stopped
    stamps: list[float] = field(default_factory=list)  # wall time of each round's log line

    @property
    def name(self) -> str:
        return f"{self.task}-seed{self.seed}"

    def log_path(self, runs: Path) -> Path:
        final = runs / self.name / "run.log"
        return final if final.is_file() else runs / f".{self.name}.partial" / "run.log"

    def read_rounds(self, runs: Path) -> None:
        try:
            lines = self.log_path(runs).read_text().splitlines()
        except OSError:
            return
        stamps = []
        for line in lines:
            m = ROUND_LINE.match(line)
            if m:
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                stamps.append(t)
        self.stamps = stamps

    def predicted_end(self, rounds: int, tail: float) -> float | None:
        """Wall-clock time (epoch seconds) this run should end, from its last round gaps;
        the first round is left out: it carries the start-up (CUDA context, cuDNN plans)."""
        if len(self.stamps) < 3:
            return None
        gaps = [b - a for a, b in itertools.pairwise(self.stamps[1:])][-3:]
        return self.stamps[-1] + (rounds - len(self.stamps)) * sum(gaps) / len(gaps) + tail


def install(log: Path) -> dict[str, str]:
    wheels = sorted(str(p) for p in (LEASE / "whl").glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels],
        check=True,
    )  # fmt: skip
    say(f"installed {len(wheels)} wheels into {SITE}", log)
    return {"PYTHONPATH": f"{SITE}:{REPO}"}


def restore_data(manifest: dict, cache: Path, log: Path, lease: Path = LEASE) -> None:
    root = Path(manifest["data_root"])
    made = 0
    for rel, size, mtime in manifest["files"]:
        p = root / rel
        if p.exists():
            st = p.stat()
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise SystemExit(f"{p} exists and differs from the packed data: not touched")
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        whole = lease / "files" / rel
        if whole.is_file():  # a label list: the loader reads it
            if whole.stat().st_size != size:
                raise SystemExit(f"{whole} is not the packed {rel}: size differs")
            shutil.copyfile(whole, p)
        else:
            with p.open("wb") as fh:
                fh.truncate(size)  # sparse: the loader reads only its stamp; the cache holds it
        os.utime(p, ns=(mtime, mtime))
        made += 1
    cache.mkdir(parents=True, exist_ok=True)
    for xz in sorted((lease / "cache").glob("*.pt.xz")):
        target = cache / xz.name[: -len(".xz")]
        if not target.is_file():
            with lzma.open(xz) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    say(f"data: {made} stamp files made under {root}, caches in {cache}", log)


def task_signatures(scenario: Path, root: Path, tasks: list[str]) -> dict[str, dict]:
    """Each named task's data as the real loader gives it (shape, pixel sum, label count)
    and the dataset folder under ``root`` whose files key its cache. pack.sh records these;
    ``check_data`` compares them on the lent machine, where testbed is importable only
    after the install, hence the imports here."""
    import torch

    from testbed.pluginmanager import build_host
    from testbed.scenario_load import load_scenario

    host = build_host()
    out = {}
    for t in load_scenario(scenario, host.registry).task_list():
        if t.name in tasks:
            ds = host.registry.build("datasets", t.data.name, t.data.params, data_root=root)
            params = host.registry["datasets"].get(t.data.name).params
            out[t.name] = {
                "shape": list(ds.x.shape), "sum": int(ds.x.sum(dtype=torch.int64)),
                "labels": int(ds.y.sum()),
                "folder": getattr(params.model_validate(t.data.params), "path", None),
            }  # fmt: skip
    return out


def check_data(manifest: dict, scenario: Path) -> str | None:
    """What differs between the packed tasks and what the loader gives here, or None."""
    got = task_signatures(scenario, Path(manifest["data_root"]), list(manifest["tasks"]))
    for name, packed in manifest["tasks"].items():
        if got.get(name) != packed:
            return f"task {name}: loaded {got.get(name)}, packed {packed}"
    return None


VERIFY = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from full_schedule import check_data
manifest = json.loads(Path(sys.argv[1]).read_text())
problem = check_data(manifest, Path(sys.argv[2]))
if problem:
    sys.exit(problem)
print(f"every task loads as packed: {manifest['tasks']}")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "reports/lease")))
    ap.add_argument("--budget", type=float, default=540, help="seconds from start to packed")
    ap.add_argument("--tasks", nargs="+", default=["glioma", "meningioma"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=50, help="the scenario's rounds (prediction)")
    ap.add_argument("--tail", type=float, default=60, help="first guess: last round to end")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scenario", default="scenarios/paper_baseline.toml")
    ap.add_argument("--install", action="store_true", help="install .lease/whl first")
    ap.add_argument("--bench", action="store_true", help="time the engines' step first")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="passed to runs")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/lease-work") if args.install else out / "work"
    runs_dir = work / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    log = work / "lease.log"
    deadline = time.time() + args.budget - (time.monotonic() - _T0) - 15  # 15 s to pack

    # the images restored below are empty stand-ins: the loaders key their caches by the
    # files' mtimes here, not their contents (the check below compares the images instead)
    env = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1",
        TESTBED_DATA_KEY="stamps",
    )  # fmt: skip
    if args.install:
        env.update(install(log))
        env["TESTBED_CACHE_DIR"] = "/tmp/testbed-cache"
    manifest = json.loads((LEASE / "stamps.json").read_text())
    restore_data(manifest, Path(env.get("TESTBED_CACHE_DIR", "~/.cache/testbed")).expanduser(), log)
    check = subprocess.run(
        [sys.executable, "-c", VERIFY, str(LEASE / "stamps.json"), args.scenario,
         str(Path(__file__).parent)],
        env=env, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    say((check.stdout + check.stderr).strip(), log)
    if check.returncode != 0:
        return 3
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        say(f"device: {smi.stdout.strip() or smi.stderr.strip()}", log)

    if args.bench:
        try:  # the GPU-only tests of the captured step (tests/test_captured.py)
            r = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/test_captured.py"],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=90,
            )  # fmt: skip
            say(r.stdout[-3000:] + r.stderr[-1000:], log)
        except subprocess.TimeoutExpired:
            say("GPU tests stopped at 90 s", log)
        bench = dict(env, BENCH_DEVICE="cuda", BENCH_CLIENT_SIZE="288", BENCH_ROUNDS="5",
                     BENCH_WARMUP="2")  # fmt: skip
        try:
            r = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "benchmarks/test_engine_step.py", "--benchmark-enable",
                 f"--benchmark-json={work / 'bench-engine-step-h200.json'}"],
                env=bench, cwd=REPO, capture_output=True, text=True, timeout=90,
            )  # fmt: skip
            say(r.stdout[-3000:] + r.stderr[-1000:], log)
        except subprocess.TimeoutExpired:
            say("benchmark stopped at 90 s", log)
        try:
            r = subprocess.run(
                [sys.executable, "benchmarks/step_variants.py", "--steps", "60",
                 "--out", str(work / "step-variants-h200.json")],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            say(r.stdout[-2000:] + r.stderr[-1000:], log)
        except subprocess.TimeoutExpired:
            say("step variants stopped at 60 s", log)

    order = [(t, s) for s in args.seeds for t in args.tasks]
    order.sort(key=lambda ts: (args.tasks.index(ts[0]), ts[1]))  # a task's seeds together
    runs = [Run(t, s, i) for i, (t, s) in enumerate(order)]
    tails: list[float] = []  # last round to end, of each finished run
    for run in runs:
        cmd = [
            sys.executable, "-m", "testbed.cli", "run", args.scenario, "--task", run.task,
            "--set", "evaluation.repeats=1", "--set", f"evaluation.seeds=[{run.seed}]",
            "--device", args.device, "--data-root", manifest["data_root"], "--no-progress",
            "--out", str(runs_dir / run.name),
        ]  # fmt: skip
        for s in args.sets:
            cmd += ["--set", s]
        with (work / f"{run.name}.out").open("w") as fh:
            run.proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        run.started, run.state = time.time(), "running"
    say(f"started {len(runs)} runs: {', '.join(r.name for r in runs)}", log)

    last_stop, last_note = time.time(), 0.0
    while any(r.state == "running" for r in runs):
        time.sleep(3)
        now = time.time()
        for run in runs:
            if run.state != "running":
                continue
            run.read_rounds(runs_dir)
            rc = run.proc.poll()
            if rc is not None:
                run.ended = now
                run.state = "done" if rc == 0 else "failed"
                if rc == 0 and run.stamps:
                    tails.append(now - run.stamps[-1])
                say(f"{run.name} {run.state} (rc {rc}) after {now - run.started:.0f} s", log)
        alive = [r for r in runs if r.state == "running"]
        if not alive:
            break
        if now >= deadline:
            for run in alive:
                stop(run, "deadline", log)
            break
        tail = max(tails, default=args.tail)
        ends = {r.name: r.predicted_end(args.rounds, tail) for r in alive}
        if now - last_note > 30:
            last_note = now
            say("; ".join(f"{r.name} round {len(r.stamps)}" + (
                f", ends in {ends[r.name] - now:.0f} s" if ends[r.name] else "")
                for r in alive) + f" (deadline in {deadline - now:.0f} s)", log)  # fmt: skip
        known = [e for e in ends.values() if e is not None]
        all_known = len(alive) > 1 and len(known) == len(alive)
        if all_known and now - last_stop > 25 and max(known) > deadline:
            stop(max(alive, key=lambda r: r.priority), "predicted past the deadline", log)
            last_stop = now

    summary = {
        r.name: {"state": r.state, "rounds": len(r.stamps),
                 "seconds": round((r.ended or time.time()) - r.started, 1)}
        for r in runs
    }  # fmt: skip
    say(f"summary: {json.dumps(summary)}", log)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    pack(work, runs, out)
    return 0


def stop(run: Run, why: str, log: Path) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have ended by itself
        os.killpg(run.proc.pid, signal.SIGTERM)
        try:
            run.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
    run.state, run.ended = "stopped", time.time()
    say(f"{run.name} stopped at round {len(run.stamps)}: {why}", log)


def pack(work: Path, runs: list[Run], out: Path) -> None:
    keep = ("metrics.json", "run.log", "report.md", "scenario.json")
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for p in sorted(work.glob("*")):
            if p.is_file():
                tar.add(p, arcname=p.name)
        for run in runs:
            folder = work / "runs" / run.name
            if run.state != "done":
                folder = work / "runs" / f".{run.name}.partial"
            for name in keep:
                if (folder / name).is_file():
                    tar.add(folder / name, arcname=f"{run.name}/{name}")
    shutil.copy(work / "lease.log", out / "lease.log")
    say(f"packed {out / 'results.tar.gz'}")


if __name__ == "__main__":
    sys.exit(main())
