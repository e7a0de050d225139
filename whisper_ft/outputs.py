"""Output-folder safety: training writes only into an empty folder or one of its own runs.

A run folder is recognised by the marker this module writes when a run starts (MARKER), or, for runs made
before the marker existed, by the files only this tool writes there: checkpoint-<step>/ folders holding
trainer_state.json, or metrics.jsonl beside config.yaml. Anything else that is not empty (a model folder, the
repository, the folder of the config file) is refused before the model loads, with what was found and what
to do; so is a folder that holds an input of the run (the config file, the base model, a local dataset).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from whisper_ft.checkpoint import NAME, STATE_FILE, CheckpointError

MARKER = ".whisper-ft-run"
MARKER_TEXT = "This folder is a whisper-ft training run: checkpoints, metrics.jsonl, config.yaml and the final model.\n"
# Files a run writes beside its checkpoints; only with the marker or a checkpoint do they make a folder a run.
RUN_FILES = ("metrics.jsonl", "config.yaml")


def is_run(folder: Path) -> bool:
    """A folder this tool made: its marker, a checkpoint-<step>/ with trainer_state.json, or metrics.jsonl with
    config.yaml (a run stopped before its first checkpoint)."""
    if (folder / MARKER).is_file():
        return True
    if all((folder / f).is_file() for f in RUN_FILES):
        return True
    return any(NAME.match(p.name) and (p / STATE_FILE).is_file() for p in folder.iterdir() if p.is_dir())


def _inside(path: Path, folder: Path) -> bool:
    """path is folder or lies under it (both resolved)."""
    return path == folder or folder in path.parents


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def writable_problem(folder: Path) -> str | None:
    """Why nothing can be written at folder (a file on the way, no permission, a read-only file system), or None."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return (f"{existing} is a file, not a folder, so checkpoint_dir {folder} cannot be created; choose another "
                "checkpoint_dir (or checkpoint_name)")
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable by this user"
        return f"{existing} {why}, so checkpoint_dir {folder} cannot be written; choose another checkpoint_dir"
    return None


def check_output_dir(out: str | Path, *, inputs: dict[str, str | Path | None], repository: Path | None = None) -> None:
    """Refuse (CheckpointError) an output folder that is not safe to write into; nothing is written here.

    inputs: what the run reads ({"the config file": path, "whisper_pretrained": path, ...}); none may lie inside
    the output folder, since the run would write over them. repository: this project's own folder.
    """
    folder = _resolved(out)
    problem = writable_problem(folder)
    if problem:
        raise CheckpointError(problem)
    if repository is not None and folder == _resolved(repository):
        raise CheckpointError(f"checkpoint_dir {folder} is the whisper-ft repository itself; choose a folder of its "
                              "own, e.g. ./checkpoints/<name>")
    for what, path in inputs.items():
        if not path or not Path(path).expanduser().exists():
            continue  # a Hub id, or nothing given
        p = _resolved(path)
        if what == "the config file" and folder.is_dir() and p == folder / "config.yaml" and is_run(folder):
            continue  # the run's own config.yaml, written by this tool: rerunning with it is fine
        if _inside(p, folder):
            raise CheckpointError(f"checkpoint_dir {folder} holds {what} ({p}); training would write over it. "
                                  "Choose a checkpoint_dir of its own, e.g. a new folder under ./checkpoints")
    if folder.is_dir() and any(folder.iterdir()) and not is_run(folder):
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        raise CheckpointError(f"checkpoint_dir {folder} is not empty and is not a whisper-ft run (it holds "
                              f"{', '.join(found[:8])}{', ...' if len(found) > 8 else ''}); training writes "
                              "checkpoints, config.yaml and model files there and would overwrite these. Choose an "
                              "empty or new folder (or a new checkpoint_name)")


def claim(out: Path) -> None:
    """Create the run folder and its marker (before anything else is written there)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MARKER).is_file():
            (out / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"cannot write to checkpoint_dir {out}: {e.strerror or e}; "
                              f"{free_space(out)}") from None


def free_space(path: Path) -> str:
    """'N GB free under X', for messages about a failed write."""
    existing = Path(path)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        return f"{human_bytes(shutil.disk_usage(existing).free)} free under {existing}"
    except OSError:
        return f"free space under {existing} unknown"


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def config_file(argv: list[str] | None) -> str | None:
    """The --config file the command line names (or ./config.yaml, read when none is given)."""
    import sys

    from whisper_ft.config import DEFAULT_CONFIG, build_parser

    args, _ = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    path = getattr(args, "config", None)
    return path if path is not None else (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)


def check_training_output(cfg, argv: list[str] | None) -> None:
    """check_output_dir for training's checkpoint_dir, with the run's inputs: config file, base model, data."""
    inputs = {"the config file": config_file(argv), "the base model (whisper_pretrained)": cfg.whisper_pretrained,
              "the dataset (dataset_name)": cfg.dataset_name, "replay_dataset": cfg.replay_dataset}
    for name, spec in (cfg.eval_sets or {}).items():
        if isinstance(spec, dict):
            inputs[f"eval set {name}'s dataset"] = spec.get("dataset_name")
    check_output_dir(cfg.checkpoint_dir, inputs=inputs, repository=Path(__file__).resolve().parent.parent)
