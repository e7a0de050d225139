"""Where an export may write: an empty or new folder, or a previous export of the same format by this tool.

Every export is written into a temporary folder beside the output and renamed into place at the end, with
a marker file (whisper-ft-export.json, naming the format) that later runs recognise. --force replaces only
a folder holding that marker for the same format: never a training run, the input model, a folder that
contains the input, or a folder of files this tool did not write.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MARKER = "whisper-ft-export.json"
# Files that make a folder a training run (checkpoint_dir) or a model: never replaced by an export.
RUN_FILES = ("metrics.jsonl", "trainer_state.json", "training_args.bin", "config.yaml")


class OutputError(Exception):
    pass


def previous_format(out: Path) -> str | None:
    """The format a previous export recorded in out's marker, or None when out holds no readable marker."""
    try:
        return json.loads((out / MARKER).read_text())["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _why_not_replaceable(out: Path, fmt: str) -> str:
    if any(out.glob("checkpoint-*")) or any((out / name).exists() for name in RUN_FILES):
        return "it holds a training run (checkpoint-* folders or run files)"
    found = previous_format(out)
    if found is None:
        return "it holds files that whisper-ft export did not write (no " + MARKER + ")"
    if found != fmt:
        return f"it holds a {found} export, not a {fmt} one"
    return ""


def check_output(out: Path, fmt: str, inputs: list[Path], force: bool) -> None:
    """Refuse, before anything is written, an output folder that the export must not touch."""
    resolved = out.resolve()
    for inp in inputs:
        inp = inp.resolve()
        if resolved == inp or resolved in inp.parents:
            raise OutputError(f"--output-dir {out} is {'the input model' if resolved == inp else 'a folder holding the input model ' + str(inp)}; "
                              "choose a new folder for the export")
        if inp in resolved.parents:
            raise OutputError(f"--output-dir {out} is inside the input model {inp}; choose a folder outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--output-dir {out} is a file, not a folder; choose a new folder")
    if not any(out.iterdir()):
        return
    why = _why_not_replaceable(out, fmt)
    if why:
        raise OutputError(f"--output-dir {out} is not empty and {why}; nothing was written. "
                          "Choose a new or empty folder" + ("" if "did not write" in why or "run" in why
                                                            else ", or the same format"))
    if not force:
        raise OutputError(f"--output-dir {out} holds a previous {fmt} export; pass --force to replace it "
                          "or choose another folder")


def write_export(out: Path, fmt: str, inputs: list[Path], force: bool, fill: Callable[[Path], dict]) -> Path:
    """Check out, let fill(tmp) write the export into a temporary folder beside it, add the marker, then
    swap it into place: an interrupted export leaves no half-written folder that a runtime would load."""
    check_output(out, fmt, inputs, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        info = fill(tmp) or {}
        (tmp / MARKER).write_text(json.dumps({"format": fmt, **info}, indent=1) + "\n")
        if out.exists():
            check_output(out, fmt, inputs, force)  # unchanged since the first check
            old = out.parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
