"""Print the summary table that ends benchmarks/gpu_check.sh.

Usage: python benchmarks/summarize.py OUT_DIR [--steps DIR]

Reads DIR/steps.tsv (name, exit status, seconds per step; DIR defaults to OUT_DIR) and, for
each step, the ``summary`` rows of <step>.json in OUT_DIR or else in DIR, when the step wrote
one. Writes OUT_DIR/summary.json: each step's status and its whole JSON result, so that the
results of steps whose files stay in DIR come back with the few files the device tool returns.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def load_steps(out: pathlib.Path, steps_dir: pathlib.Path | None = None) -> list[dict]:
    steps_dir = steps_dir or out
    steps = []
    for line in (steps_dir / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        result = load_result(name, out, steps_dir)
        summary = result.get("summary") if isinstance(result, dict) else None
        steps.append(
            {"step": name, "rc": int(rc), "seconds": int(seconds), "summary": summary,
             "result": result}
        )  # fmt: skip
    return steps


def load_result(name: str, *dirs: pathlib.Path) -> dict | None:
    """The step's JSON, or a note saying why there is none usable. A step killed at its time
    limit while writing leaves a cut file: that must cost its own summary, not everyone's."""
    for d in dirs:
        path = d / f"{name}.json"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as e:
                return {"error": f"{path} unreadable: {type(e).__name__}: {e}"}
    return None


def format_rows(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return lines


def _note(step: dict) -> str:
    """Why a step has no usable result, in a few words (timeout's exit statuses: 124 when the
    time limit sent SIGINT, 137 when the step then had to be killed)."""
    notes = {124: "time limit", 137: "killed at time limit"}.get(step["rc"], "")
    if isinstance(step["result"], dict) and "error" in step["result"]:
        notes = ", ".join(filter(None, [notes, str(step["result"]["error"])[:100]]))
    elif step["result"] is None and step["step"] != "gpu_tests":
        notes = ", ".join(filter(None, [notes, "no JSON"]))
    return notes


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(out: pathlib.Path, steps_dir: pathlib.Path | None = None) -> int:
    steps = load_steps(out, steps_dir)
    (out / "summary.json").write_text(json.dumps(steps, indent=1))
    print("\n=== summary")
    for line in format_rows([dict(step=s["step"], rc=s["rc"], seconds=s["seconds"],
                                  note=_note(s)) for s in steps]):  # fmt: skip
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
    parser.add_argument(
        "--steps", type=pathlib.Path, default=None,
        help="the folder with steps.tsv and the other steps' JSON (default: out_dir)",
    )  # fmt: skip
    args = parser.parse_args()
    sys.exit(main(args.out_dir, args.steps))
