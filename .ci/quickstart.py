"""Print the N-th (1-based) fenced shell block of README.md's "## Quick start" section.

Used by .ci/run so that CI executes exactly what the README tells users to run. Exits non-zero
if the section does not hold exactly two single-line blocks, so a README edit that breaks the
Quick start contract fails CI.
"""

import pathlib
import re
import sys


def quickstart_blocks(readme: str) -> list[str]:
    match = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if match is None:
        raise SystemExit("README.md has no '## Quick start' section")
    blocks = re.findall(r"^```(?:sh|bash|shell)?\n(.*?)^```", match.group(1), re.M | re.S)
    if len(blocks) != 2 or any(len(b.strip().splitlines()) != 1 for b in blocks):
        raise SystemExit("'## Quick start' must hold exactly two fenced blocks of one line each")
    return [b.strip() for b in blocks]


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parent.parent
    print(quickstart_blocks((root / "README.md").read_text())[int(sys.argv[1]) - 1])
