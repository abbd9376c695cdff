"""Print the summary table that ends benchmarks/gpu_check.sh.

Usage: python benchmarks/summarize.py OUT_DIR

Reads OUT_DIR/steps.tsv (name, exit status, seconds per step) and, for each step, the
``summary`` rows of OUT_DIR/<step>.json when the step wrote one. Writes OUT_DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def load_steps(out: pathlib.Path) -> list[dict]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        result = out / f"{name}.json"
        summary = json.loads(result.read_text()).get("summary") if result.exists() else None
        steps.append({"step": name, "rc": int(rc), "seconds": int(seconds), "summary": summary})
    return steps


def format_rows(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return lines


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(out: pathlib.Path) -> int:
    steps = load_steps(out)
    (out / "summary.json").write_text(json.dumps(steps, indent=1))
    print("\n=== summary")
    for line in format_rows([{k: s[k] for k in ("step", "rc", "seconds")} for s in steps]):
        print(line)
    for s in steps:
        if s["summary"]:
            rows = s["summary"] if isinstance(s["summary"], list) else [s["summary"]]
            print(f"\n--- {s['step']}")
            for line in format_rows(rows):
                print(line)
    failed = [s["step"] for s in steps if s["rc"] != 0]
    print(
        f"\n{len(steps) - len(failed)} passed, {len(failed)} failed"
        + (f": {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path, help="the folder gpu_check.sh wrote")
    sys.exit(main(parser.parse_args().out_dir))
