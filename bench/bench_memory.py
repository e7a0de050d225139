"""Peak GPU memory and samples/s of train_loop.py for each way of fitting a large Whisper on a small GPU.

    python bench/bench_memory.py                                # large-v3 shape, batch 16, all modes (GPU)
    python bench/bench_memory.py --modes full lora --steps 20
    python bench/bench_memory.py --shape tiny --steps 4 --cpu   # a quick check of the script itself

Each mode is a fresh `python train_loop.py` on the committed English clips with gradient checkpointing,
bf16 (on CUDA), no evaluation and no checkpoint; the model is a randomly initialised Whisper of the
chosen shape (large-v3: d_model 1280, 32+32 layers, 20 heads, 128 mel bins, vocab 51866), built once,
so nothing is downloaded. Numbers come from the run's metrics.jsonl: samples/s of the last log window
(the first steps, with their warm-up, are in an earlier window) and the process's peak GPU memory
(peak_gpu_memory_gb, GiB). bench_gpu.py --memory-table covers the checkpointing settings of a full
fine-tune; this one the memory-saving modes (frozen encoder, LoRA, 8-bit AdamW). Compare modes within one run of this script, on one card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {  # what each mode changes from a full fine-tune
    "full": {},
    "frozen_encoder": {"freeze_encoder": True},
    "lora": {"lora_r": 32, "learning_rate": 1e-4},
    "adamw_8bit": {"optim": "adamw_8bit"},
}
SHAPES = {"large-v3": dict(d_model=1280, layers=32, heads=20, num_mel_bins=128, vocab_size=51866),
          "tiny": dict(d_model=64, layers=2, heads=4, num_mel_bins=128)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="large-v3")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per mode; timed over the second half")
    p.add_argument("--torch-compile", choices=("auto", "true", "false"), default="auto",
                   help="train_loop.py's torch_compile (false saves the compile time of each mode)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (only to check the script)")
    args = p.parse_args()

    from whisper_ft import tiny

    data = ROOT / "tests" / "data" / "cv-en"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny.build(Path(tmp) / "model", tiny.texts_from_tsv(data / "validated.tsv"), init_std=0.02,
                           **SHAPES[args.shape])
        for mode in args.modes:
            out = Path(tmp) / mode
            cfg = {"lang": "en", "whisper_pretrained": str(model), "checkpoint_dir": str(out),
                   "dataset_name": str(data), "train_split": "train", "eval_strategy": "no",
                   "load_best_model_at_end": False, "per_device_train_batch_size": args.batch,
                   "learning_rate": 1e-5, "warmup_steps": 0, "max_steps": args.steps, "save_steps": 10**6,
                   "logging_steps": max(1, args.steps // 2), "gradient_checkpointing": "true", "fp16": False,
                   "bf16": not args.cpu, "report_to": "none", "dataloader_num_workers": 4,
                   "torch_compile": args.torch_compile, **MODES[mode]}
            path = Path(tmp) / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
            env = {"ACCELERATE_USE_CPU": "true"} if args.cpu else {}
            proc = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), "--config", str(path)], cwd=ROOT,
                                  capture_output=True, text=True, env={**__import__("os").environ, **env})
            if proc.returncode:
                rows.append((mode, None, None, proc.stderr.strip().splitlines()[-1][:120]))
            else:
                logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in line]
                rows.append((mode, logged[-1].get("peak_gpu_memory_gb"), logged[-1]["samples_per_second"], ""))
            # large-v3's final checkpoint and export take up to 24 GB per mode: a 64 GB disk fills by the fourth
            shutil.rmtree(out, ignore_errors=True)
            print(f"{mode}: {rows[-1][1:]}", file=sys.stderr, flush=True)  # kept if a later mode is cut off
    print(f"\n{args.shape} shape, batch {args.batch}, gradient checkpointing, {'fp32 CPU' if args.cpu else 'bf16'}, "
          f"torch_compile {args.torch_compile}")
    print("| mode | peak GPU memory (GiB) | samples/s | note |\n|---|---|---|---|")
    for mode, memory, sps, note in rows:
        print(f"| {mode} | {memory if memory is not None else '-'} | {f'{sps:.1f}' if sps else '-'} | {note} |")


if __name__ == "__main__":
    main()
