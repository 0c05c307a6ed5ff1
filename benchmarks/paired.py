"""Interleaved, paired timings of the attack-cost workloads, for a shared, loaded machine.

    python benchmarks/paired.py [--attacks FGSM PGD-10] [--repeats 3] [--stock] [--threads N]
                                [--out F.md]

pytest-benchmark (test_attack_cost.py) times all rounds of one implementation, then all
rounds of the next: when other processes' load changes between the two, so does the ratio.
Here every repeat runs bare, ART (and stock ART) back to back in a rotating order, and the
ART / bare ratio is taken within each repeat; the table gives the median over repeats, of
wall-clock time and of the process's CPU time. With `--threads 1` the CPU time is the work
done, whatever else the machine runs (no idle threads spinning at barriers): the most
load-proof measure of an overhead ratio that a shared 2-core machine offers.
Same workloads and knobs (BENCH_QUICK) as the benchmarks; see workloads.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from workloads import ALPHA, ATTACKS, EPS, SEED, SHAPES, shape_id, stock_attack, workload

from testbed.builtins.attacks import reference_linf_attack
from testbed.pluginmanager import build_host
from testbed.transfer import numpy_seeded


def runners(registry, shape, attack, impls):
    w = workload(shape)
    name, params, max_iter, random_init = ATTACKS[attack]
    out = {}
    for impl in impls:
        if impl == "bare":

            def run():
                return reference_linf_attack(
                    w.model,
                    w.x,
                    w.y,
                    eps=EPS,
                    eps_step=EPS if attack == "FGSM" else ALPHA,
                    max_iter=max_iter,
                    random_init=random_init,
                )
        else:
            atk = (
                registry.build("attacks", name, params, estimator=w.estimator)
                if impl == "art"
                else stock_attack(attack, w.estimator)
            )

            def run(atk=atk):
                return atk.generate(x=w.x_np, y=w.y_onehot)

        out[impl] = run
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["FGSM", "PGD-10"], choices=list(ATTACKS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stock", action="store_true", help="also time stock ART")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = ["bare", "art"] + (["stock"] if args.stock else [])
    registry = build_host(autoload=False).registry
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; repeats {args.repeats}; "
        "ratios: median over repeats of the within-repeat ratio (min-max)",
        "",
        "| shape | attack | "
        + " | ".join(f"{i} wall / CPU" for i in impls)
        + " | "
        + " | ".join(f"{i} / bare wall | {i} / bare CPU" for i in impls[1:])
        + " |",
        "|---|---|" + "---|" * (len(impls) + 2 * (len(impls) - 1)),
    ]
    for shape in SHAPES:
        for attack in args.attacks:
            run = runners(registry, shape, attack, impls)
            wall: dict[str, list[float]] = {i: [] for i in impls}
            cpu: dict[str, list[float]] = {i: [] for i in impls}
            for rep in range(args.repeats):
                order = impls[rep % len(impls) :] + impls[: rep % len(impls)]
                for impl in order:
                    with numpy_seeded(SEED):
                        t0, c0 = time.perf_counter(), time.process_time()
                        run[impl]()
                        wall[impl].append(time.perf_counter() - t0)
                        cpu[impl].append(time.process_time() - c0)
            cells = [
                f"{statistics.median(wall[i]):.2f} s / {statistics.median(cpu[i]):.2f} s"
                for i in impls
            ]
            for impl in impls[1:]:
                for t in (wall, cpu):
                    r = [a / b for a, b in zip(t[impl], t["bare"], strict=True)]
                    cells.append(f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})")
            lines.append(f"| {shape_id(shape)} | {attack} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
