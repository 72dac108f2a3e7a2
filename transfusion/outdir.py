"""Output folders: which command wrote a folder, and what ``--overwrite`` may replace.

Every command that writes a folder (prepare, train, sample, demo, ablate) leaves a marker file,
``.transfusion.json``, naming itself. ``--overwrite`` replaces only a folder whose marker names
the same command; any other non-empty folder (another command's output, the user's own files) is
refused with a line that says what is there. Hints point at what the user most likely meant
(``--data demo`` -> ``--data demo/data``), never at a flag that would delete another command's
work.
"""

from __future__ import annotations

import json
from pathlib import Path

from transfusion.config import UserError

MARKER = ".transfusion.json"


def write_marker(folder, command: str) -> None:
    (Path(folder) / MARKER).write_text(json.dumps({"written_by": f"transfusion {command}"}) + "\n")


def written_by(folder) -> str | None:
    """The command (``prepare``, ``train``, ...) whose marker ``folder`` holds, or None."""
    try:
        rec = json.loads((Path(folder) / MARKER).read_text())
        return str(rec["written_by"]).split()[-1]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def contents(folder, most: int = 6) -> str:
    """``a/, b.json, ...``: the visible entries of ``folder`` (folders with a slash)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir() if p.name != MARKER)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_out(out, command: str, overwrite: bool, *, also: str = "", legacy=None, flag: bool = True) -> None:
    """UserError unless ``command`` may write ``--out out``: it does not exist, is an empty
    folder, or (with ``overwrite``) holds ``command``'s own earlier output. ``also`` lists other
    options that accept the folder (``--resume``); ``legacy(out)`` recognises the command's
    output written before markers existed; ``flag``: the command has ``--overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    owner = written_by(out)
    own = owner == command or (owner is None and legacy is not None and legacy(out))
    if own and overwrite:
        return
    if own:
        raise UserError(
            f"--out {out} is not empty: it holds an earlier `transfusion {command}` output "
            f"({contents(out)}); pass --overwrite{also} or another --out"
        )
    what = (
        f"the output of `transfusion {owner}` ({contents(out)})"
        if owner
        else f"files `transfusion {command}` did not write ({contents(out)})"
    )
    rule = (
        f"--overwrite replaces only an earlier `transfusion {command}` output"
        if flag
        else f"`transfusion {command}` adds only to its own earlier output"
    )
    raise UserError(f"--out {out} holds {what}; {rule}, so nothing was changed: pass a new or empty --out")


def subfolder_with(path, filename: str) -> Path | None:
    """The first subfolder of ``path`` holding ``filename`` (``demo`` -> ``demo/data`` for
    prepare.json): what the user most likely meant when ``path`` itself lacks it."""
    path = Path(path)
    if not path.is_dir():
        return None
    return next((p for p in sorted(path.iterdir()) if p.is_dir() and (p / filename).is_file()), None)
