"""Training state on disk: save, find, prune, export.

A checkpoint is `checkpoint-<step>/`: accelerate's save_state (model, optimizer, scaler, RNG of
every process) plus our `trainer_state.json` (step, best metric, data position, counters). It is
written to `checkpoint-<step>.tmp/`, marked complete, then renamed, and only then are old ones
pruned; so a kill at any moment leaves the previous checkpoint intact (DESIGN: checkpoint rotation).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"  # written last: a folder without it is a save that was interrupted
EXPORT_TMP = ".export.tmp"  # the final model as it is written, moved into the run folder once whole
NAME = re.compile(r"^checkpoint-(\d+)$")
# Checkpoints found but not trusted (incomplete, an inconsistent state, a file that does not read or load): named
# when skipped, then never pruned or saved over by this process, so what the user may want to inspect stays.
_untrusted: set[Path] = set()


class CheckpointError(Exception):
    pass


def step_of(path: Path) -> int:
    m = NAME.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, newest (highest step, numerically) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and NAME.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of, reverse=True)


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def save(accelerator, root: Path, step: int, state: dict[str, Any], process_state: dict | None = None) -> Path:
    """Write checkpoint-<step> crash-safely; every process must call this (each saves its RNG state).

    process_state is this process's own position (a streamed shard's), saved as process-<rank>.json.
    """
    final, tmp = root / f"checkpoint-{step}", root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with _quiet("accelerate.utils.other"):  # its "Removed shared tensor proj_out.weight" note is expected:
            accelerator.save_state(str(tmp), safe_serialization=True)  # load_state re-ties it (tested)
        if process_state is not None:
            _write_synced(tmp / f"process-{accelerator.process_index}.json", json.dumps(process_state))
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            _fsync_tree(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_synced(tmp / COMPLETE, str(step))
            if final.exists():
                if final.resolve() in _untrusted:  # skipped at the resume: kept for the user, under another name
                    aside = _free_name(root, f"checkpoint-{step}.skipped")
                    os.replace(final, aside)
                else:  # the same step saved again by this run (e.g. a stop right after a scheduled save)
                    shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    # torch.save reports a full disk as RuntimeError ("file write failed"), safetensors as its own error type
    except Exception as e:  # noqa: BLE001 - whatever the writer raised, the partial save must go
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        from whisper_ft.outputs import free_space
        reason = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"saving {final} failed ({type(e).__name__}: {reason}); {free_space(root)}. The "
                              "partial folder was removed and earlier checkpoints are intact; free some space (or "
                              "fix the folder) and rerun the same command to resume") from None
    accelerator.wait_for_everyone()
    return final


def read_process_state(path: Path, rank: int) -> dict[str, Any] | None:
    """This process's own data position, or None when the run saved none (the position follows from the step)."""
    file = path / f"process-{rank}.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None


def prune(root: Path, limit: int, keep: set[Path]) -> list[Path]:
    """Remove the oldest complete checkpoints beyond `limit`, never one in `keep` (best, resumed-from)."""
    if limit <= 0:
        return []
    keep = {p.resolve() for p in keep if p}
    trusted = [p for p in list_checkpoints(root) if p.resolve() not in _untrusted]
    removed = [p for p in trusted[limit:] if p.resolve() not in keep]
    for path in removed:
        shutil.rmtree(path)
    for tmp in root.glob("checkpoint-*.tmp"):  # leftovers of saves killed mid-way
        shutil.rmtree(tmp, ignore_errors=True)
    return removed


def export_model(unwrapped_model, processor, out_dir: Path, state_dict: dict | None = None) -> None:
    """A standalone model folder: save_pretrained keeps tied weights loadable (DESIGN: tied output projection).

    Written to `.export.tmp/` and moved into out_dir with config.json last, after the previous export's config.json
    and weights are removed: out_dir holds a config.json only when the last export completed, which is what a
    rerun reads as "this run is finished" (DESIGN: a final model that is whole or absent).

    state_dict is the whole model gathered by accelerator.get_state_dict (FSDP and ZeRO-3 shard the
    weights, so the unwrapped model's own parameters are only this process's pieces).
    """
    config = unwrapped_model.config
    training_value, config.use_cache = config.use_cache, True  # off only for training; users generate with it
    tmp = out_dir / EXPORT_TMP
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for old in [out_dir / "config.json", *out_dir.glob("model*.safetensors*")]:
            old.unlink(missing_ok=True)
        unwrapped_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        processor.save_pretrained(tmp)
        # transformers 5 keeps the feature extractor's settings inside processor_config.json; older transformers,
        # faster-whisper's converter and other tools read preprocessor_config.json. Write both.
        processor.feature_extractor.save_pretrained(tmp)
        _fsync_tree(tmp)
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):  # config.json last
            os.replace(path, out_dir / path.name)
        _fsync_dir(out_dir)
        tmp.rmdir()
    except Exception as e:  # noqa: BLE001 - a full disk is an OSError, a RuntimeError or safetensors' own error
        from whisper_ft.outputs import free_space
        shutil.rmtree(tmp, ignore_errors=True)
        reason = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"writing the final model to {out_dir} failed ({type(e).__name__}: {reason}); "
                              f"{free_space(out_dir)}. The checkpoints are intact: free some space and rerun the "
                              "same command to export again") from None
    finally:
        config.use_cache = training_value


def check_shared(accelerator, root: Path, wait_s: float = 10.0) -> None:
    """Every process must see checkpoint_dir as the main process writes it.

    Checkpoints, the config dump and the final model are written once, by the main process, and every
    process reads the checkpoint it resumes from; with several machines checkpoint_dir must therefore
    be one shared folder (NFS, a cluster filesystem). A node-local folder would leave the other machines
    without the checkpoint and resuming from nothing, so it is refused here, before any training.
    """
    import time
    import uuid

    import torch
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return
    marker = root / f".shared-check-{broadcast_object_list([uuid.uuid4().hex])[0]}"
    if accelerator.is_main_process:
        _write_synced(marker, "written by the main process; removed once every process has seen it")
    accelerator.wait_for_everyone()
    deadline = time.monotonic() + wait_s  # a network filesystem may show a new file after a short delay
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = int(accelerator.reduce(torch.tensor(int(marker.is_file()), device=accelerator.device), "sum"))
    if accelerator.is_main_process:
        marker.unlink()
    if seen < accelerator.num_processes:
        raise CheckpointError(f"checkpoint_dir {root} is not shared: {accelerator.num_processes - seen} of "
                              f"{accelerator.num_processes} processes cannot see what the main process writes there. "
                              "With several machines, put checkpoint_dir on a filesystem every machine mounts at the "
                              "same path.")


def agree_on_resume(accelerator, found: Path | None) -> None:
    """All processes must resume from the same checkpoint (or all start fresh), else they would diverge."""
    import torch

    step = torch.tensor(step_of(found) if found is not None else -1, device=accelerator.device)
    low, high = int(accelerator.reduce(-step, "max")), int(accelerator.reduce(step, "max"))
    if -low != high:
        raise CheckpointError(f"the processes found different checkpoints to resume from (steps {-low} to {high}; "
                              "-1 is none) in checkpoint_dir; is it one folder shared by every machine?")


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_name(root: Path, name: str) -> Path:
    path, n = root / name, 1
    while path.exists():
        n += 1
        path = root / f"{name}-{n}"
    return path


def _skip(path: Path, say, why: str) -> None:
    _untrusted.add(path.resolve())
    say(f"skipping {path.name}: {why}")


def kept_note(root: Path) -> str | None:
    """What the resume skipped and keeps untouched, for the run's log; None when nothing was skipped."""
    names = sorted((p.name for p in _untrusted if p.parent == root.resolve()), key=lambda n: step_of(Path(n)))
    if not names:
        return None
    return (f"kept as they are for you to inspect, never pruned or saved over: {', '.join(names)} (a save at the "
            "same step moves the old folder to checkpoint-<step>.skipped)")


def find_resumable(root: Path, say, skip: set[Path] = frozenset()) -> Path | None:
    """The newest checkpoint that is complete and readable; unreadable ones are reported and skipped.

    Finding checkpoints but being able to read none stops the run: silently starting again from step 0
    would overwrite a night of training. Nothing is ever deleted here: an untrusted checkpoint (incomplete, a
    state that is not complete and consistent with its folder's step, a file that does not read) stays for the
    user to inspect; prune() never removes it and save() moves it aside to checkpoint-<step>.skipped rather than
    save over it.
    """
    candidates = [p for p in root.glob("checkpoint-*") if p.is_dir() and NAME.match(p.name)] if root.is_dir() else []
    for path in sorted(candidates, key=step_of, reverse=True):
        if path in skip:
            continue
        if not (path / COMPLETE).is_file():
            _skip(path, say, "incomplete (its save was interrupted)")
            continue
        try:
            saved = read_state(path)
        except (OSError, ValueError, KeyError) as e:
            _skip(path, say, f"unreadable ({STATE_FILE}: {e})")
            continue
        from whisper_ft.state import state_problem
        problem = state_problem(saved, step_of(path))
        if problem:
            _skip(path, say, f"its {STATE_FILE} cannot be trusted (it {problem})")
            continue
        problem = unreadable_file(path)
        if problem:
            _skip(path, say, f"unreadable ({problem})")
            continue
        return path
    if candidates:
        raise CheckpointError(f"{root} holds checkpoints but none is complete and readable; refusing to start "
                              "over from step 0. Move them away (or set a new checkpoint_name) to start fresh.")
    return None


def unreadable_file(folder: Path) -> str | None:
    """The first file of a checkpoint that cannot be read whole, and why; None when all can.

    Cheap but real: a safetensors file's header must parse and its tensors must end exactly at the
    file's end; torch's zip files (optimizer.bin, random_states_*.pkl, scaler.pt) must have their
    central directory (written last, so a truncated file has none) and every member within the file;
    JSON must parse. A disk that truncated or zeroed a file fails one of these; bit flips inside the
    tensor data would only show at load, which resume() catches.
    """
    import struct
    import zipfile

    for path in sorted(folder.iterdir()):
        try:
            size = path.stat().st_size
            if path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    head = f.read(8)
                    if len(head) < 8:
                        return f"{path.name}: truncated ({size} bytes)"
                    n = struct.unpack("<Q", head)[0]
                    if n > size - 8:
                        return f"{path.name}: truncated (header says {n} bytes, file has {size})"
                    header = json.loads(f.read(n))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end != size:
                    return f"{path.name}: {size} bytes, but its tensors need {8 + n + end}"
            elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
                if not zipfile.is_zipfile(path):
                    return f"{path.name}: truncated or not a torch file"
                with zipfile.ZipFile(path) as z:
                    if any(i.header_offset + i.compress_size > size for i in z.infolist()):
                        return f"{path.name}: truncated"
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as e:
            return f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def resume(accelerator, root: Path, say, accept=lambda state: state) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the newest loadable checkpoint into the accelerator's model and optimizer: (its path, its state).

    `accept(state)` sees the checkpoint's state before anything is loaded and returns the state to go on
    with, or raises (another run's checkpoint must be refused, not half-loaded into this model). A
    checkpoint that passes find_resumable's checks but still fails to load (damaged tensor data) is
    reported by name and the next older one is loaded instead; the later load overwrites everything the
    failed one may have half-loaded.
    """
    failed: set[Path] = set()
    while True:
        path = find_resumable(root, say, skip=failed)
        if path is None:
            return None, None
        state = accept(read_state(path))
        try:
            accelerator.load_state(str(path))
            return path, state
        except Exception as e:  # safetensors, torch and pickle raise many types for a damaged file
            _skip(path, say, f"could not be loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
            failed.add(path)


def checkpoint_bytes(n_params: int, trained: int | None = None) -> int:
    """A checkpoint's size: fp32 weights of what it holds (the trained weights with LoRA or a frozen encoder, whose
    checkpoints skip the frozen base) and AdamW's two fp32 moments of the trained weights."""
    trained = n_params if trained is None else min(trained, n_params)
    return trained * 4 * 3


def check_disk(root: Path, n_params: int, save_total_limit: int, say, trained: int | None = None,
               free: int | None = None) -> None:
    """Before training: refuse when one checkpoint plus the final model cannot fit on the disk (CheckpointError),
    warn when the checkpoints the run keeps cannot.

    `trained` weights (default all) are what a checkpoint holds: with LoRA or a frozen encoder only those.
    """
    from whisper_ft.outputs import human_bytes

    per_checkpoint = checkpoint_bytes(n_params, trained)
    final = n_params * 4  # the exported fp32 model
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free if free is None else free
    keep = save_total_limit or 5
    if free < per_checkpoint + final:
        raise CheckpointError(f"{human_bytes(free)} free under {existing}, but one checkpoint "
                              f"({human_bytes(per_checkpoint)}: {n_params:,} weights, AdamW state of "
                              f"{(trained if trained is not None else n_params):,}) plus the final model "
                              f"({human_bytes(final)}) need {human_bytes(per_checkpoint + final)}; free some space or "
                              "choose a checkpoint_dir on a larger disk")
    need = per_checkpoint * (keep + 1) + final  # + one being written, + the export
    if free < need:
        say(f"warning: {human_bytes(free)} free under {existing}, but about {human_bytes(need)} is needed for "
            f"{save_total_limit or 'all'} checkpoints of {human_bytes(per_checkpoint)} plus the final model; "
            "lower save_total_limit or free some space")
