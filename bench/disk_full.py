"""A disk that really fills up in the middle of a run: on a small file system, another writer takes the free
space while training runs, so the next save meets ENOSPC from the kernel, not an injected error.

    sudo python bench/disk_full.py                 mounts a tmpfs of --size under /tmp (needs root)
    python bench/disk_full.py --dir /mnt/small     any small file system you have

Three cases: half a checkpoint's space left (the save fails), none (the next metrics.jsonl line fails), one
checkpoint and half the model (the final export fails). Each must end with exit code 1, a message naming the
failed write and the free space, no traceback, no checkpoint-*.tmp, every metrics.jsonl line whole and every
checkpoint byte-identical; with the space freed, the same command must finish with the weights of an
uninterrupted run on a normal disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_injection import ROOT, config, launch  # noqa: E402  (the same tiny run, on one thread)

from whisper_ft.metrics_log import read_rows  # noqa: E402

STEPS, SAVE = 60, 30


def run_config(model: Path, out: Path) -> dict:
    """fault_injection's run, saving at SAVE and STEPS only, keeping every checkpoint, with TensorBoard on."""
    return {**config(model, out, STEPS), "save_steps": SAVE, "save_total_limit": 0, "report_to": "tensorboard"}


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fill(path: Path, leave: int) -> None:
    """Write `path` until the file system is full, then give back `leave` bytes."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    try:
        os.truncate(path, max(0, path.stat().st_size - leave))
    except OSError:
        pass


def case(model: Path, small: Path, name: str, leave, failed: str) -> bool:
    """Train to step SAVE, then rerun; once it trains on, fill the disk leaving leave(checkpoint bytes) free.
    `failed` is the write the message must name. Every checkpoint on disk must stay byte-identical."""
    out = small / f"run-{len(list(small.glob('run-*')))}"
    cfg_path = small.parent / f"{out.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(model, out)))
    stopped = launch(cfg_path, "--stop-at-step", str(SAVE))
    assert stopped.wait() == 0, stopped.stderr.read()[-2000:]
    first = checksums(out / f"checkpoint-{SAVE}")
    checkpoint_size = sum(p.stat().st_size for p in (out / f"checkpoint-{SAVE}").rglob("*") if p.is_file())
    proc = launch(cfg_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    # Fill the disk once the resumed run trains (past its disk check, which would refuse before training).
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not any(r.get("step", 0) > SAVE + 1 for r in read_rows(metrics)):
        time.sleep(0.02)
    fill(small / "filler", leave(checkpoint_size))
    code = proc.wait()
    reader.join()
    err = "".join(lines)
    saved = {p.name: checksums(p) for p in out.glob("checkpoint-*") if p.is_dir()}
    checks = {
        "exit code 1": code == 1,
        f"names the failed write ({failed}) and the free space": failed in err and "free under" in err,
        "no traceback": "Traceback" not in err,
        "no checkpoint-*.tmp left": not list(out.glob("checkpoint-*.tmp")),
        f"checkpoint-{SAVE} byte-identical": saved.get(f"checkpoint-{SAVE}") == first,
        "every metrics.jsonl line whole": len(read_rows(metrics)) == len(metrics.read_text().splitlines()),
    }
    (small / "filler").unlink()
    again = launch(cfg_path)
    again_err = again.stderr.read()
    checks["space freed: the same command finishes"] = again.wait() == 0
    checks["after the rerun, every checkpoint it found byte-identical"] = all(
        checksums(out / name) == sums for name, sums in saved.items())
    if (out / "model.safetensors").is_file():
        final, straight = load_file(out / "model.safetensors"), load_file(small.parent / "straight/model.safetensors")
        checks["final weights identical to an uninterrupted run"] = final.keys() == straight.keys() and all(
            torch.equal(final[k], straight[k]) for k in final)
    else:
        checks["final weights identical to an uninterrupted run"] = False
    print(f"\n{name}:")
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not all(checks.values()):
        for which, text in (("the run on the full disk", err), ("the rerun", again_err)):
            print(f"  --- {which}, last lines of stderr:\n" + "\n".join("  " + s for s in text.splitlines()[-12:]))
    return all(checks.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, help="a folder on a small file system (default: mount a tmpfs)")
    ap.add_argument("--size", default="64M", help="size of the tmpfs to mount (default 64M)")
    args = ap.parse_args()
    from whisper_ft import tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small, mounted = args.dir, False
        if small is None:
            small = tmp / "small"
            small.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size}", "tmpfs", str(small)], check=True)
            mounted = True
        try:
            model = tiny.build(tmp / "model", tiny.texts_from_tsv(ROOT / "tests/data/cv-en/validated.tsv"))
            n_params = sum(t.numel() for t in load_file(model / "model.safetensors").values())
            (tmp / "straight.yaml").write_text(yaml.safe_dump(run_config(model, tmp / "straight")))
            t0 = time.time()
            proc = launch(tmp / "straight.yaml")
            assert proc.wait() == 0, proc.stderr.read()[-2000:]
            model_bytes = 4 * n_params
            print(f"uninterrupted run on {tmp}: {STEPS} steps in {time.time() - t0:.0f} s; model {model_bytes / 1e6:.1f} "
                  f"MB; small file system: {small}")
            ok = [case(model, small, "the disk fills up to half a checkpoint's space: the save fails",
                       lambda ckpt: ckpt // 2, f"checkpoint-{STEPS} failed"),
                  case(model, small, "the disk fills up completely: the next metrics line fails",
                       lambda ckpt: 0, "cannot write"),
                  case(model, small, "one checkpoint fits, the final model does not: the export fails",
                       lambda ckpt: ckpt + model_bytes // 2, "writing the final model")]
        finally:
            if mounted:
                subprocess.run(["umount", str(small)], check=False)
    print(f"\n{sum(ok)} of {len(ok)} cases held")
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
