"""Kill a real training run with SIGKILL at random moments, resume after each kill, and compare the
final weights with an uninterrupted run of the same config: they must be identical.

    python bench/fault_injection.py [--kills 20] [--steps 30] [--seed 0]

The run saves every step (save_steps 1), so many kills land inside a save; each resume must pick
the newest complete checkpoint and continue step-exactly.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def config(model: Path, out: Path, steps: int) -> dict:
    return {"lang": "en", "whisper_pretrained": str(model), "checkpoint_dir": str(out),
            "dataset_name": str(ROOT / "tests/data/cv-en"), "eval_split": "dev", "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "warmup_steps": 3, "max_steps": steps,
            "save_steps": 1, "save_total_limit": 2, "eval_strategy": "no", "load_best_model_at_end": False,
            "logging_steps": 1, "gradient_checkpointing": False, "fp16": False, "dataloader_num_workers": 0,
            "report_to": "none"}


def launch(cfg_path: Path, *args: str) -> subprocess.Popen:
    """train_loop.py on one thread (the same sums every run), stderr piped."""
    return subprocess.Popen([sys.executable, str(ROOT / "train_loop.py"), "--config", str(cfg_path), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def newest(out: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    from whisper_ft import tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny.build(tmp / "model", tiny.texts_from_tsv(ROOT / "tests/data/cv-en/validated.tsv"))
        for name in ("straight", "killed"):
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config(model, tmp / name, args.steps)))
        t0 = time.time()
        proc = launch(tmp / "straight.yaml")
        assert proc.wait() == 0, proc.stderr.read()
        straight_s = time.time() - t0
        print(f"uninterrupted run: {args.steps} steps in {straight_s:.1f} s")
        step_s = straight_s / args.steps

        kills = 0
        while True:
            proc = launch(tmp / "killed.yaml")
            if kills < args.kills:
                # Wait for this attempt to make progress (a new checkpoint), then kill at a random moment
                # within the next two steps: in training, in a save, or in a rename.
                before = newest(tmp / "killed")
                while proc.poll() is None and newest(tmp / "killed") <= before:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 2.0 * step_s))
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    kills += 1
                    print(f"kill {kills:2d}: newest complete checkpoint now step {newest(tmp / 'killed')}")
                    continue
            code = proc.wait()
            assert code == 0, proc.stderr.read()[-2000:]
            if newest(tmp / "killed") >= args.steps:
                break
        a = load_file(tmp / "straight" / "model.safetensors")
        b = load_file(tmp / "killed" / "model.safetensors")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"{kills} SIGKILLs, resumed after each; final weights identical to the uninterrupted run: {same}")
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
