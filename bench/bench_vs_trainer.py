"""Training throughput of our loop (train_loop.py) against transformers' Seq2SeqTrainer, on CPU.

    python bench/bench_vs_trainer.py [--steps 40] [--workers 0] [--repeats 1] [--threads N]

Both sides train the same tiny random Whisper (built offline into a temp dir by whisper_ft.tiny) on the
same data (tests/data/cv-en, train split, 25 clips, prepared by our whisper_ft.data.Prepare), with the
same per-device batch size, learning rate, warmup, max_steps, dataloader_num_workers and torch thread
count, in fp32 on the CPU (CUDA hidden), with no evaluation and no checkpointing. Each side runs in its
own fresh subprocess.

What is timed (the same span on both sides): optimizer steps log_every+1 .. steps, i.e. the first
`--log-every` steps (default 10) are warmup and not timed; process start-up, model loading, and our
loop's final checkpoint save + model export are outside the span.
  (a) ours: samples/s of each `metrics.jsonl` log line (one window of log_every steps each), first window
      dropped, the rest combined as (sum of samples) / (sum of window seconds); a window's samples come
      from the change in `epoch` x number of training records, its seconds = samples / samples_per_second.
  (b) Seq2SeqTrainer: a TrainerCallback records time.perf_counter() at every on_step_end, and
      training_step records the batch size it was given; samples/s = samples of steps log_every+1..steps
      / (time at step `steps` - time at step `log_every`).
With 25 clips and batch 8 both loaders yield 8, 8, 8, 1 samples per epoch, so both time the same
number of samples (checked and printed).

Choices made to compare the loops rather than their defaults (each can be flipped by a flag):
  * --threads 1 by default, for both: on a shared 2-core machine, 2 OpenMP threads collapse 5-40x as soon
    as another process runs (spin-waiting), which swamps any difference between the loops;
  * the Trainer side gets persistent dataloader workers when --workers > 0, as our loop has; the Trainer's
    own default (--trainer-fresh-workers) restarts the workers every epoch, i.e. every 4 steps here;
  * the Trainer side uses our Collator minus ids/bad/seconds; --blog-collator uses the blog's
    DataCollatorSpeechSeq2SeqWithPadding (feature_extractor.pad + tokenizer.pad) instead;
  * the Trainer keeps its default optimizer (adamw_torch_fused; ours is torch.optim.AdamW), see --trainer-optim.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "cv-en"
LANG = "en"


# ---------------------------------------------------------------------------------------------
# The Trainer side (runs in its own subprocess: `--trainer-worker SPEC.json`)


def trainer_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from whisper_ft.collate import Collator
    from whisper_ft.data import Bad, Prepare, RecordDataset
    from whisper_ft.sources import load_records
    from whisper_ft.languages import resolve
    from whisper_ft.model import load_whisper

    torch.set_num_threads(spec["threads"])
    processor, model = load_whisper(spec["model"], resolve(LANG), "transcribe")  # same labels as our loop
    model.config.use_cache = False  # as our loop does
    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    records = [r for r in load_records(str(DATA), "train") if not isinstance(prepare.labels(r.text), Bad)]
    start_id = model.config.decoder_start_token_id

    if spec["blog_collator"]:
        collate = BlogCollator(processor, start_id)
    else:
        collate = ModelInputsCollator(Collator(start_id))

    times: list[float] = []
    samples: list[int] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    class CountingTrainer(Seq2SeqTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            samples.append(int(inputs["input_features"].shape[0]))
            return super().training_step(model, inputs, num_items_in_batch)

    extra = {"optim": spec["trainer_optim"]} if spec["trainer_optim"] else {}
    args = Seq2SeqTrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        learning_rate=spec["lr"], warmup_steps=spec["warmup"], lr_scheduler_type="linear", max_steps=spec["steps"],
        weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"], fp16=False, bf16=False,
        eval_strategy="no", save_strategy="no", logging_steps=spec["log_every"], report_to="none", use_cpu=True,
        dataloader_num_workers=spec["workers"], dataloader_persistent_workers=spec["workers"] > 0 and spec["persistent"],
        remove_unused_columns=False,  # our samples carry "id"/"seconds"; the collator drops them instead
        **extra,
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=RecordDataset(records, prepare),
                              data_collator=collate, callbacks=[StepClock()])
    trainer.train()
    result = {"times": times, "samples": samples, "optim": str(getattr(args.optim, "value", args.optim)),
              "threads": torch.get_num_threads(), "n_train": len(records),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")


class ModelInputsCollator:
    """Our Collator, minus the keys the model does not take (ids, bad, seconds)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, samples):
        batch = self.inner(samples)
        if "input_features" not in batch:
            raise RuntimeError(f"a batch with no usable sample: {batch['bad']}")
        return {"input_features": batch["input_features"], "labels": batch["labels"]}


class BlogCollator:
    """DataCollatorSpeechSeq2SeqWithPadding from the Hugging Face fine-tune-whisper blog, on our samples."""

    def __init__(self, processor, decoder_start_token_id: int):
        self.processor, self.decoder_start_token_id = processor, decoder_start_token_id

    def __call__(self, features):
        input_features = [{"input_features": f["input_features"]} for f in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
        label_features = [{"input_ids": f["labels"]} for f in features]
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return dict(batch)


# ---------------------------------------------------------------------------------------------
# The driver


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
        sys.exit(f"{cmd[1]} exited with {rc}; last lines of {log}:\n{tail}")
    return wall


def run_ours(a, tmp: Path, model_dir: Path, n_train: int, tag: str) -> dict:
    out = tmp / f"ours-{tag}"
    cfg = {
        "lang": LANG, "whisper_pretrained": str(model_dir), "dataset_name": str(DATA), "checkpoint_dir": str(out),
        "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1, "learning_rate": a.lr,
        "warmup_steps": a.warmup, "lr_scheduler_type": "linear", "max_steps": a.steps, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "seed": a.seed, "logging_steps": a.log_every, "dataloader_num_workers": a.workers,
        "eval_strategy": "no", "eval_at_start": False, "load_best_model_at_end": False, "save_steps": 100000,
        "report_to": "none", "gradient_checkpointing": False, "fp16": False, "bf16": False,
    }
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint there would make the loop resume, not train
    cfg_path = tmp / f"ours-{tag}.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")  # JSON is YAML
    wall = run_logged([sys.executable, "train_loop.py", "--config", str(cfg_path)], tmp / f"ours-{tag}.log",
                      child_env(a.threads))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    windows = [x for x in lines if "samples_per_second" in x]
    seen_total = next((x["samples_seen"] for x in reversed(lines) if "samples_seen" in x), None)
    if seen_total and windows[-1]["epoch"]:  # the loop's own count of training records (after its filtering)
        n_train = round(seen_total / windows[-1]["epoch"])
    seen_before, samples, seconds = 0, 0, 0.0
    for i, w in enumerate(windows):
        seen = round(w["epoch"] * n_train)
        if i > 0:  # the first window (steps 1..log_every) is warmup
            samples += seen - seen_before
            seconds += (seen - seen_before) / w["samples_per_second"]
        seen_before = seen
    return {"sps": samples / seconds, "samples": samples, "seconds": seconds, "wall": wall,
            "windows": [round(w["samples_per_second"], 2) for w in windows[1:]],
            "losses": [w["loss"] for w in windows]}


def run_trainer(a, tmp: Path, model_dir: Path, tag: str) -> dict:
    spec = {"model": str(model_dir), "out": str(tmp / f"trainer-{tag}"), "result": str(tmp / f"trainer-{tag}.json"),
            "batch": a.batch, "lr": a.lr, "warmup": a.warmup, "steps": a.steps, "seed": a.seed,
            "log_every": a.log_every, "workers": a.workers, "threads": a.threads, "persistent": not a.trainer_fresh_workers,
            "blog_collator": a.blog_collator, "trainer_optim": a.trainer_optim}
    shutil.rmtree(spec["out"], ignore_errors=True)
    spec_path = tmp / f"trainer-{tag}.spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    wall = run_logged([sys.executable, str(Path(__file__).resolve()), "--trainer-worker", str(spec_path)],
                      tmp / f"trainer-{tag}.log", child_env(a.threads))
    r = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
    times, samples = r["times"], r["samples"]
    if len(times) != a.steps or len(samples) != a.steps:
        sys.exit(f"Trainer ran {len(times)} steps ({len(samples)} training_step calls), expected {a.steps}")
    k = a.log_every
    n = sum(samples[k:])
    seconds = times[-1] - times[k - 1]
    per_window = [sum(samples[i:i + k]) / (times[i + k - 1] - times[i - 1]) for i in range(k, a.steps, k)]
    return {"sps": n / seconds, "samples": n, "seconds": seconds, "wall": wall, "optim": r["optim"],
            "threads": r["threads"], "windows": [round(x, 2) for x in per_window], "losses": r["losses"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (a multiple of --log-every)")
    p.add_argument("--log-every", type=int, default=10,
                   help="logging_steps of both; the first window of this many steps is warmup, not timed")
    p.add_argument("--workers", type=int, default=0, help="dataloader_num_workers of both")
    p.add_argument("--batch", type=int, default=8, help="per-device train batch size of both")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads of both (0 = torch's default here, one per core). Default 1: with more "
                        "threads, OpenMP spin-waiting makes timings collapse 10x or more whenever anything else runs")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=5, help="LR warmup steps of both (a schedule, not the timing warmup)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=1, help="run the pair this many times, alternating which goes first")
    p.add_argument("--d-model", type=int, default=64, help="size of the tiny Whisper")
    p.add_argument("--blog-collator", action="store_true",
                   help="Trainer side uses the blog's DataCollatorSpeechSeq2SeqWithPadding instead of our Collator")
    p.add_argument("--trainer-optim", default="",
                   help="Seq2SeqTrainingArguments.optim (default: the Trainer's own default)")
    p.add_argument("--trainer-fresh-workers", action="store_true",
                   help="Trainer side without persistent workers (its default; ours keeps workers across epochs)")
    p.add_argument("--keep", default="", help="keep the temp dir (model, configs, logs) here instead of deleting it")
    p.add_argument("--trainer-worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.trainer_worker:
        trainer_worker(a.trainer_worker)
        return 0
    if a.steps % a.log_every or a.steps <= a.log_every:
        p.error(f"--steps must be a multiple of --log-every ({a.log_every}) and larger than it")

    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    a.threads = a.threads or torch.get_num_threads()
    if a.keep:
        tmp = Path(a.keep).resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        holder = None
    else:
        holder = tempfile.TemporaryDirectory(prefix="bench-vs-trainer-")
        tmp = Path(holder.name)
    try:
        t0 = time.perf_counter()
        load_before = os.getloadavg()
        model_dir = tmp / "model"
        from whisper_ft import tiny
        tiny.build(model_dir, tiny.texts_from_tsv(DATA / "validated.tsv"), d_model=a.d_model)
        from whisper_ft.sources import load_records
        n_train = len(load_records(str(DATA), "train"))

        results = []
        for rep in range(a.repeats):
            order = ("ours", "trainer") if rep % 2 == 0 else ("trainer", "ours")
            r = {}
            for side in order:
                r[side] = run_ours(a, tmp, model_dir, n_train, str(rep)) if side == "ours" else \
                    run_trainer(a, tmp, model_dir, str(rep))
                print(f"  run {rep + 1}/{a.repeats} {side:8s}: {r[side]['sps']:.2f} samples/s "
                      f"(timed windows of {a.log_every} steps: {r[side]['windows']})", file=sys.stderr, flush=True)
            results.append(r)
        load_after = os.getloadavg()

        tr0 = results[0]["trainer"]
        print()
        print(f"settings: steps {a.steps} (timed {a.log_every + 1}..{a.steps}, first {a.log_every} = warmup), "
              f"batch {a.batch}, workers {a.workers}, torch threads {a.threads} (trainer saw {tr0['threads']}), "
              f"fp32 CPU, lr {a.lr:g}, warmup {a.warmup}, tiny Whisper d_model {a.d_model}, {n_train} train clips")
        print(f"          trainer: optim {tr0['optim']}, collator "
              f"{'blog DataCollatorSpeechSeq2SeqWithPadding' if a.blog_collator else 'ours minus ids/bad/seconds'}, "
              f"persistent workers {a.workers > 0 and not a.trainer_fresh_workers}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
              f"load avg {load_before[0]:.2f} before / {load_after[0]:.2f} after")
        print()
        print("| run | ours samples/s | trainer samples/s | ours/trainer | timed samples (ours, trainer) "
              "| process wall s (ours*, trainer) |")
        print("|---|---|---|---|---|---|")
        for i, r in enumerate(results):
            o, t = r["ours"], r["trainer"]
            print(f"| {i + 1} | {o['sps']:.2f} | {t['sps']:.2f} | {o['sps'] / t['sps']:.3f} | "
                  f"{o['samples']}, {t['samples']} | {o['wall']:.1f}, {t['wall']:.1f} |")
        if len(results) > 1:
            mo = statistics.median(r["ours"]["sps"] for r in results)
            mt = statistics.median(r["trainer"]["sps"] for r in results)
            ratio = statistics.median(r["ours"]["sps"] / r["trainer"]["sps"] for r in results)
            print(f"| median | {mo:.2f} | {mt:.2f} | {ratio:.3f} | | |")
        print()
        print("* process wall = the whole subprocess: start-up, model load, all steps, and for ours also the final "
              "checkpoint save and model export (the Trainer side saves nothing). Not the compared number.")
        if any(r["ours"]["samples"] != r["trainer"]["samples"] for r in results):
            print("WARNING: the two sides timed different numbers of samples")
        print(f"final-window loss: ours {results[0]['ours']['losses'][-1]:.3f}, "
              f"trainer {results[0]['trainer']['losses'][-1]:.3f} (sanity only: data order differs)")
        print(f"total bench time {time.perf_counter() - t0:.0f} s" + (f"; files kept in {tmp}" if a.keep else ""))
    finally:
        if holder is not None:
            holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
