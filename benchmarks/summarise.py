"""Summarise pytest-benchmark JSON from benchmarks/ as a Markdown table of ratios.

    python benchmarks/summarise.py [FILE_OR_DIR ...] [--out FILE.md]

With no path, reads the newest JSON under .benchmarks/ (what `tox -e bench` autosaves).
Directories are searched recursively; with several files, a later file's result replaces an
earlier one's for the same (shape, attack, impl). Prints the table; --out also writes it.
Targets (docs/BENCHMARKS.md): ART / bare <= 1.05, PGD-40 / PGD-20 within 2.0 +- 0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RATIO_MAX = 1.05
SCALING = (1.9, 2.1)
ATTACK_ORDER = ("FGSM", "BIM-20", "PGD-10", "PGD-20", "PGD-40")


def find_json(paths: list[str]) -> list[Path]:
    if not paths:
        found = sorted(Path(".benchmarks").rglob("*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            sys.exit(
                "no JSON under .benchmarks/: run `tox -e bench` or pass a --benchmark-json file"
            )
        return found[-1:]
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    return files


def load(files: list[Path]) -> tuple[dict[tuple[str, str, str], dict], dict]:
    """(shape, attack, impl) -> stats, plus the last file's machine/run info."""
    results: dict[tuple[str, str, str], dict] = {}
    info: dict = {}
    for f in files:
        data = json.loads(f.read_text())
        for b in data.get("benchmarks", []):
            extra = b.get("extra_info", {})
            if not {"shape", "attack", "impl"} <= extra.keys():
                continue  # not one of ours
            key = (extra["shape"], extra["attack"], extra["impl"])
            results[key] = {**b["stats"], **extra}
        info = {
            "file": str(f),
            "datetime": data.get("datetime", "?"),
            "cpu": data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?"),
            "python": data.get("machine_info", {}).get("python_version", "?"),
        }
    return results, info


def fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f} s" if x < 10 else f"{x:.1f} s")


def fmt_r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def median(results: dict, shape: str, attack: str, impl: str) -> float | None:
    r = results.get((shape, attack, impl))
    return None if r is None else r["median"]


def summarise(results: dict, info: dict) -> str:
    shapes = sorted({k[0] for k in results}, key=lambda s: [int(v) for v in s.split("x")])
    attacks = sorted(
        {k[1] for k in results},
        key=lambda a: ATTACK_ORDER.index(a) if a in ATTACK_ORDER else len(ATTACK_ORDER),
    )
    any_result = next(iter(results.values()))
    has_stock = any(k[2] == "stock" for k in results)
    lines = [
        f"Source: `{info['file']}` ({info['datetime']}); CPU: {info['cpu']}; "
        f"torch {any_result.get('torch', '?')}, {any_result.get('threads', '?')} threads; "
        f"batch {any_result.get('batch', '?')}, eps {any_result.get('eps', '?')}, "
        f"alpha {any_result.get('alpha', '?')}"
        + ("; QUICK mode (tiny shapes)" if any_result.get("quick") else ""),
        "",
        "| shape | attack | bare median | ART median | ART / bare | rounds (bare, ART) | "
        f"ratio <= {RATIO_MAX} |" + (" stock ART median | stock / bare |" if has_stock else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if has_stock else ""),
    ]
    for shape in shapes:
        for attack in attacks:
            bare = median(results, shape, attack, "bare")
            art = median(results, shape, attack, "art")
            ratio = art / bare if bare and art else None
            rounds = ", ".join(
                str(results[(shape, attack, i)]["rounds"]) if (shape, attack, i) in results else "-"
                for i in ("bare", "art")
            )
            ok = "-" if ratio is None else ("yes" if ratio <= RATIO_MAX else "no")
            row = (
                f"| {shape} | {attack} | {fmt_s(bare)} | {fmt_s(art)} | {fmt_r(ratio)} | "
                f"{rounds} | {ok} |"
            )
            if has_stock:
                stock = median(results, shape, attack, "stock")
                row += f" {fmt_s(stock)} | {fmt_r(stock / bare if bare and stock else None)} |"
            lines.append(row)
    lines += [
        "",
        "| shape | PGD-40 / PGD-20 bare | PGD-40 / PGD-20 ART | "
        f"ART within {SCALING[0]}-{SCALING[1]} |",
        "|---|---|---|---|",
    ]
    for shape in shapes:
        scal = {}
        for impl in ("bare", "art"):
            p20 = median(results, shape, "PGD-20", impl)
            p40 = median(results, shape, "PGD-40", impl)
            scal[impl] = p40 / p20 if p20 and p40 else None
        ok = (
            "-"
            if scal["art"] is None
            else ("yes" if SCALING[0] <= scal["art"] <= SCALING[1] else "no")
        )
        lines.append(f"| {shape} | {fmt_r(scal['bare'])} | {fmt_r(scal['art'])} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", help="pytest-benchmark JSON files or folders")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args(argv)
    results, info = load(find_json(args.paths))
    if not results:
        sys.exit("no attack-cost benchmarks (extra_info shape/attack/impl) in the JSON")
    text = summarise(results, info)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
