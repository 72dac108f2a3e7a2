"""Print the README's own shell commands, so that CI runs what the README says.

    python3 .ci/readme_commands.py install test     # the blocks marked <!-- ci: install -->, <!-- ci: test -->

A README code block is marked by an HTML comment on the line before its opening fence,
``<!-- ci: NAME -->``; the block's lines are printed as they stand (comments and all), in the
order the names are given. An unknown name is an error, so a renamed block cannot silently drop
a step from CI.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^<!-- ci: (?P<name>[\w-]+) -->\n```[\w-]*\n(?P<body>.*?)^```", re.M | re.S)


def blocks(text: str | None = None) -> dict[str, str]:
    """{name: the block's text} for every marked block of the README."""
    found = {}
    for m in BLOCK.finditer(README.read_text() if text is None else text):
        if m["name"] in found:
            raise ValueError(f"README.md marks two blocks <!-- ci: {m['name']} -->")
        found[m["name"]] = m["body"]
    return found


def main(names: list[str]) -> int:
    found = blocks()
    missing = [n for n in names if n not in found]
    if missing or not names:
        print(
            f"readme_commands: no README block marked <!-- ci: {', '.join(missing) or 'NAME'} -->; "
            f"marked: {', '.join(found)}",
            file=sys.stderr,
        )
        return 2
    print("".join(found[n] for n in names), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
