"""Training and evaluation speed of whisper-ft against Seq2SeqTrainer and a bare-loop ceiling, on one GPU.

    python bench/bench_gpu.py                               # whisper-small shape, bf16, batch 32, no checkpointing
    python bench/bench_gpu.py --guide                       # the guide's settings: fp16, batch 16, checkpointing on
    python bench/bench_gpu.py --model medium --batch 16 --gradient-checkpointing encoder
    python bench/bench_gpu.py --memory-table                # small/medium/large-v3 x checkpointing false/encoder/true
    python bench/bench_gpu.py --device cpu --model tiny --steps 4 --log-every 2 --batch 2 ...   # the CPU smoke test

Offline: the model is a Whisper of the named size's dimensions (tiny, base, small, medium, large-v3) with random
weights and a tokenizer of the real vocabulary size (51865; 51866 for large-v3), built into a temp dir by
whisper_ft.tiny; the data are the committed clips (tests/data/cv-en) repeated into manifests of --train-rows and
--eval-samples rows. Every measurement runs in its own subprocess (its own CUDA memory peak and compile caches):

  train.ours             train_loop.py, the real entry point, with a config of these settings (torch_compile as
                         --torch-compile, default auto = on with CUDA); samples/s from metrics.jsonl windows
  train.trainer          Seq2SeqTrainer: the same model (same checkpointing layers), Prepare'd records, collator
                         (ours, minus ids/bad/seconds), batch, precision, workers (persistent), lr schedule, clipping
  train.ceiling_eager    a bare PyTorch step on synthetic tensors already on the device (no data loading)
  train.ceiling_compiled the same step with the model under torch.compile
  eval.ours              whisper_ft.evaluation.evaluate, as the training loop calls it (length-ordered batches,
                         static KV cache + compiled decoder step when torch_compile is on)
  eval.trainer           Seq2SeqTrainer.evaluate(predict_with_generate=True) with a compute_metrics (without one it
                         never generates), same batch size and generation_max_length, one decoding pass per
                         clip as ours (force_unique_generate_call; docs/DESIGN.md "one decoding pass")

Timed: training steps log_every+1 .. steps (the first window is warmup: compilation, worker start); evaluation
twice over the same set, the second pass is the compared one (the first includes compilation, also shown).
FLOPs per training sample: whisper_ft.speed.training_flops_per_sample, a per-layer matmul count (3 x forward;
convolutions, projections, MLPs, attention scores and values, output projection) with the mean label tokens of
the data; MFU = samples/s x FLOPs / the card's dense bf16 peak (whisper_ft.speed.PEAK_TFLOPS by name, else
unknown). Output: one JSON object on stdout (and in --json), a Markdown summary on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / "tests" / "data" / "cv-en"
LANG = "en"
# d_model, encoder = decoder layers, attention heads, MLP width, mel bins, vocabulary: the released checkpoints'.
SHAPES = {
    "tiny": (384, 4, 6, 1536, 80, 51865),
    "base": (512, 6, 8, 2048, 80, 51865),
    "small": (768, 12, 12, 3072, 80, 51865),
    "medium": (1024, 24, 16, 4096, 80, 51865),
    "large-v3": (1280, 32, 20, 5120, 128, 51866),
}


# ---------------------------------------------------------------------------------------------
# Workers: each runs in its own process (`--worker KIND SPEC.json`) and writes a JSON result.


def _records(folder: str, split: str, prepare):
    from whisper_ft.data import Bad
    from whisper_ft.sources import load_records

    return [r for r in load_records(folder, split) if not isinstance(prepare.labels(r.text), Bad)]


def _device_info() -> dict:
    from whisper_ft.speed import device_peak_tflops

    name, peak = device_peak_tflops()
    return {"device_name": name, "peak_tflops": peak}


def worker_probe(spec: dict) -> dict:
    import torch

    return {**_device_info(), "cuda": torch.cuda.is_available(), "torch": torch.__version__,
            "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())}


def worker_trainer_train(spec: dict) -> dict:
    import torch
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from bench_vs_trainer import ModelInputsCollator
    from whisper_ft.collate import Collator
    from whisper_ft.data import Prepare, RecordDataset
    from whisper_ft.languages import resolve
    from whisper_ft.model import load_whisper
    from whisper_ft.speed import attention_implementation, peak_memory_gb, set_gradient_checkpointing

    precision = spec["precision"]
    processor, model = load_whisper(spec["model"], resolve(LANG), "transcribe",
                                    attn_implementation=attention_implementation(precision))
    model.config.use_cache = False
    set_gradient_checkpointing(model, spec["gradient_checkpointing"])  # the same layers as ours, "encoder" included
    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    records = _records(spec["data"], "train", prepare)
    times: list[float] = []
    samples: list[int] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels are done, not only queued
            times.append(time.perf_counter())

    class CountingTrainer(Seq2SeqTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            samples.append(int(inputs["input_features"].shape[0]))
            return super().training_step(model, inputs, num_items_in_batch)

    args = Seq2SeqTrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        learning_rate=1e-5, warmup_steps=5, lr_scheduler_type="linear", max_steps=spec["steps"], weight_decay=0.0,
        max_grad_norm=1.0, seed=42, fp16=precision == "fp16", bf16=precision == "bf16", eval_strategy="no",
        save_strategy="no", logging_steps=spec["log_every"], report_to="none", use_cpu=spec["cpu"],
        dataloader_num_workers=spec["workers"], dataloader_persistent_workers=spec["workers"] > 0,
        remove_unused_columns=False)
    trainer = CountingTrainer(model=model, args=args, train_dataset=RecordDataset(records, prepare),
                              data_collator=ModelInputsCollator(Collator(model.config.decoder_start_token_id)),
                              callbacks=[StepClock()])
    trainer.train()
    k = spec["log_every"]
    return {**_device_info(), "samples_per_second": sum(samples[k:]) / (times[-1] - times[k - 1]),
            "timed_samples": sum(samples[k:]), "peak_gpu_memory_gb": peak_memory_gb(),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def worker_ceiling(spec: dict) -> dict:
    """A bare training step on tensors already on the device: what the model alone costs."""
    import torch
    import torch.nn.functional as F
    from transformers import WhisperForConditionalGeneration

    from whisper_ft.collate import decoder_inputs
    from whisper_ft.speed import attention_implementation, peak_memory_gb, set_gradient_checkpointing

    cuda = torch.cuda.is_available() and not spec["cpu"]
    device = torch.device("cuda" if cuda else "cpu")
    precision = spec["precision"]
    model = WhisperForConditionalGeneration.from_pretrained(
        spec["model"], attn_implementation=attention_implementation(precision)).to(device).train()
    model.config.use_cache = False
    set_gradient_checkpointing(model, spec["gradient_checkpointing"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    gen = torch.Generator().manual_seed(0)
    batch, width = spec["batch"], spec["label_width"]
    features = torch.randn(batch, model.config.num_mel_bins, 3000, generator=gen).to(device)
    labels = torch.randint(300, 40000, (batch, width), generator=gen).to(device)
    inputs = decoder_inputs(model.config)(labels)
    forward = torch.compile(model, dynamic=False) if spec["compiled"] else model

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(input_features=features, decoder_input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(spec["log_every"]):
        step()
    sync()
    start = time.perf_counter()
    n = spec["steps"] - spec["log_every"]
    for _ in range(n):
        step()
    sync()
    return {**_device_info(), "samples_per_second": n * batch / (time.perf_counter() - start),
            "peak_gpu_memory_gb": peak_memory_gb()}


def worker_ours_eval(spec: dict) -> dict:
    from accelerate import Accelerator

    from whisper_ft import batches, speed
    from whisper_ft.collate import Collator
    from whisper_ft.config import Config
    from whisper_ft.data import Prepare
    from whisper_ft.evaluation import evaluate
    from whisper_ft.languages import resolve
    from whisper_ft.model import generate_kwargs, load_whisper

    precision = spec["precision"]
    accelerator = Accelerator(mixed_precision=precision if precision != "fp32" else "no", cpu=spec["cpu"])
    processor, model = load_whisper(spec["model"], resolve(LANG), "transcribe",
                                    attn_implementation=speed.attention_implementation(precision))
    model.config.use_cache = False  # as after training
    model.to(accelerator.device)
    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    records = _records(spec["data"], "dev", prepare)
    cfg = Config(per_device_eval_batch_size=spec["batch"], dataloader_num_workers=spec["workers"])
    loader = batches.eval_loader(records, prepare, Collator(model.config.decoder_start_token_id), cfg, 0, 1)
    compile_on = speed.compile_wanted(spec["torch_compile"]) and not spec["cpu"]
    kwargs = {**generate_kwargs(model, spec["generation_max_length"]), **speed.generation_speedups(compile_on)}
    seconds, rows = [], []
    for _ in range(2):  # the first pass includes compilation
        start = time.perf_counter()
        _, rows, _ = evaluate(model, loader, processor.tokenizer, accelerator, generate_kwargs=kwargs)
        seconds.append(time.perf_counter() - start)
    return {**_device_info(), "seconds_first_pass": seconds[0], "seconds": seconds[1], "samples": len(rows),
            "static_cache_compiled": compile_on, "peak_gpu_memory_gb": speed.peak_memory_gb(),
            "predictions": {r["id"]: r["prediction"] for r in rows}}


def worker_trainer_eval(spec: dict) -> dict:
    import numpy as np
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from bench_vs_trainer import ModelInputsCollator
    from whisper_ft.collate import Collator
    from whisper_ft.data import Prepare, RecordDataset
    from whisper_ft.languages import resolve
    from whisper_ft.model import load_whisper
    from whisper_ft.speed import attention_implementation, peak_memory_gb

    precision = spec["precision"]
    processor, model = load_whisper(spec["model"], resolve(LANG), "transcribe",
                                    attn_implementation=attention_implementation(precision))
    model.config.use_cache = False
    tokenizer = processor.tokenizer
    prepare = Prepare(processor.feature_extractor, tokenizer)
    records = _records(spec["data"], "dev", prepare)
    predictions: list[str] = []

    def compute_metrics(pred):  # without one, Seq2SeqTrainer computes the loss and never generates
        ids = np.where(pred.predictions != -100, pred.predictions, tokenizer.pad_token_id)
        predictions[:] = [p.strip() for p in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return {"predicted": len(predictions)}

    args = Seq2SeqTrainingArguments(
        output_dir=spec["out"], per_device_eval_batch_size=spec["batch"], predict_with_generate=True,
        generation_max_length=spec["generation_max_length"], fp16=precision == "fp16", bf16=precision == "bf16",
        report_to="none", use_cpu=spec["cpu"], dataloader_num_workers=spec["workers"], remove_unused_columns=False)
    trainer = Seq2SeqTrainer(model=model, args=args, eval_dataset=RecordDataset(records, prepare),
                             data_collator=ModelInputsCollator(Collator(model.config.decoder_start_token_id)),
                             compute_metrics=compute_metrics)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        # one decoding pass per clip, as ours (DESIGN: one decoding pass): random weights emit timestamp
        # tokens, and the Trainer's generate() would otherwise decode clips again and lose on extra work
        trainer.evaluate(force_unique_generate_call=True)
        seconds.append(time.perf_counter() - start)
    return {**_device_info(), "seconds_first_pass": seconds[0], "seconds": seconds[1], "samples": len(predictions),
            "peak_gpu_memory_gb": peak_memory_gb(),
            "predictions": {r.id: p for r, p in zip(records, predictions)}}


WORKERS = {"probe": worker_probe, "trainer_train": worker_trainer_train, "ceiling": worker_ceiling,
           "ours_eval": worker_ours_eval, "trainer_eval": worker_trainer_eval}


# ---------------------------------------------------------------------------------------------
# The driver


class Bench:
    def __init__(self, a, tmp: Path):
        self.a, self.tmp, self.n = a, tmp, 0

    def env(self) -> dict[str, str]:
        kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]  # e.g. carried packages
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench"), *kept]), TOKENIZERS_PARALLELISM="false")
        if self.a.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def run(self, cmd: list[str], name: str) -> tuple[int, str]:
        self.n += 1
        log = self.tmp / f"{self.n:02d}-{name}.log"
        say(f"  {name} ...")
        with open(log, "w", encoding="utf-8") as f:
            rc = subprocess.run(cmd, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT).returncode
        return rc, log.read_text(encoding="utf-8", errors="replace")

    def worker(self, kind: str, spec: dict) -> dict:
        spec_path = self.tmp / f"{kind}-{self.n + 1}.json"
        spec["result"] = str(spec_path.with_suffix(".out.json"))
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        rc, log = self.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_path)], kind)
        if rc != 0:
            return failure(rc, log)
        return json.loads(Path(spec["result"]).read_text(encoding="utf-8"))

    def ours_train(self, model_dir: Path, data: Path, n_train: int, model: str, batch: int, precision: str,
                   checkpointing: str, steps: int, log_every: int) -> dict:
        out = self.tmp / "ours-train"
        shutil.rmtree(out, ignore_errors=True)
        cfg = {"lang": LANG, "whisper_pretrained": str(model_dir), "dataset_name": str(data), "train_split": "train",
               "eval_split": "dev", "checkpoint_dir": str(out), "per_device_train_batch_size": batch,
               "gradient_accumulation_steps": 1, "learning_rate": 1e-5, "warmup_steps": 5, "max_steps": steps,
               "logging_steps": log_every, "dataloader_num_workers": self.a.workers, "eval_strategy": "no",
               "eval_at_start": False, "load_best_model_at_end": False, "save_steps": 10**9, "report_to": "none",
               "gradient_checkpointing": checkpointing, "fp16": precision == "fp16", "bf16": precision == "bf16",
               "torch_compile": self.a.torch_compile, "model_name": f"whisper-{model}"}
        path = self.tmp / "ours-train.yaml"
        path.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
        cmd = [sys.executable, "train_loop.py", "--config", str(path)]
        if self.a.profile:  # the last few steps under torch.profiler (their samples/s carry its overhead)
            profiled = f"{steps - min(5, log_every) + 1}-{steps}"
            cmd = [sys.executable, "bench/profile_loop.py", "--steps", profiled, "--out", self.a.profile, "--", *cmd[2:]]
        rc, log = self.run(cmd, f"ours-train-{model}")
        if rc != 0:
            return failure(rc, log)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        shutil.rmtree(out, ignore_errors=True)  # checkpoints of large shapes fill the disk
        windows = [x for x in lines if "samples_per_second" in x]
        samples = seconds = 0.0
        for before, w in zip(windows, windows[1:]):  # the first window is warmup
            n = round((w["epoch"] - before["epoch"]) * n_train)
            samples, seconds = samples + n, seconds + n / w["samples_per_second"]
        final = lines[-1]
        attention = re.search(r"^attention (\S+?),? (?:\((\w+) kernel\))?", log, re.MULTILINE)  # the start-up line
        return {"samples_per_second": samples / seconds if seconds else None, "timed_samples": int(samples),
                "mfu_percent_logged": windows[-1].get("mfu_percent"),
                "peak_gpu_memory_gb": max((w.get("peak_gpu_memory_gb") or 0 for w in windows), default=0) or None,
                "compiled_graphs": final.get("compiled_graphs"), "recompiled_graphs": final.get("recompiled_graphs"),
                "attention": attention.group(1) if attention else None,
                "attention_kernel": attention.group(2) if attention else None,
                "compile_fallback": "compilation failed" in log,
                **({"profiled_steps": profiled, "profile": self.a.profile} if self.a.profile else {})}


def failure(rc: int, log: str) -> dict:
    oom = "out of memory" in log.lower()
    tail = "\n".join(log.splitlines()[-15:])
    if not oom:
        say(f"    failed (exit {rc}):\n{tail}")
    return {"error": "out of memory" if oom else f"exit {rc}", "log_tail": tail[-2000:]}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_data(folder: Path, train_rows: int, eval_rows: int) -> tuple[int, list[str]]:
    """train.csv and dev.csv of the committed clips repeated (absolute paths), and the texts."""
    with open(CLIPS / "validated.tsv", newline="", encoding="utf-8") as f:
        clips = [(str(CLIPS / "clips" / r["path"]), r["sentence"])
                 for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train_rows), ("dev", eval_rows)):
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "text"])
            for i in range(n):
                w.writerow(clips[i % len(clips)])
    return train_rows, [t for _, t in clips]


def build_model(shape: str, out: Path, texts: list[str]) -> Path:
    from whisper_ft import tiny

    d, layers, heads, ffn, mels, vocab = SHAPES[shape]
    # init_std 0.02 as the released checkpoints: tiny.build's 0.2 (for learning fast at width 64) overflows fp16
    return tiny.build(out, texts, d_model=d, layers=layers, heads=heads, ffn_dim=ffn, num_mel_bins=mels,
                      vocab_size=vocab, init_std=0.02)


def mean_label_tokens(model_dir: Path, texts: list[str]) -> tuple[float, int]:
    """Mean and max label tokens per sample (prefix included, start token stripped, as the collator leaves them)."""
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(model_dir)
    tok.set_prefix_tokens(language=LANG, task="transcribe")
    lengths = [len(tok(t).input_ids) - 1 for t in texts]
    return sum(lengths) / len(lengths), max(lengths)


def train_and_eval(b: Bench, a, info: dict) -> dict:
    from whisper_ft.speed import mfu, training_flops_per_sample

    model_dir = build_model(a.model, b.tmp / f"model-{a.model}", b.texts)
    from transformers import WhisperConfig

    config = WhisperConfig.from_pretrained(model_dir)
    tokens, longest = mean_label_tokens(model_dir, b.texts)
    per_sample = training_flops_per_sample(config, tokens)
    common = {"model": str(model_dir), "data": str(b.data), "batch": a.batch, "precision": a.precision,
              "gradient_checkpointing": a.gradient_checkpointing, "steps": a.steps, "log_every": a.log_every,
              "workers": a.workers, "cpu": a.device == "cpu"}
    train: dict = {}
    if "train" not in a.skip:
        train["ours"] = b.ours_train(model_dir, b.data, b.n_train, a.model, a.batch, a.precision,
                                     a.gradient_checkpointing, a.steps, a.log_every)
    if "trainer" not in a.skip:
        train["trainer"] = b.worker("trainer_train", {**common, "out": str(b.tmp / "trainer-train")})
    if "ceiling" not in a.skip:
        for compiled in (False, True):
            if compiled and a.device == "cpu" and not a.compile_ceiling_on_cpu:
                continue  # compiling the full-size graph on CPU takes minutes: not for a smoke test
            key = "ceiling_compiled" if compiled else "ceiling_eager"
            train[key] = b.worker("ceiling", {**common, "compiled": compiled, "label_width": longest})
    for name, r in train.items():
        sps = r.get("samples_per_second")
        width = longest if name.startswith("ceiling") else tokens
        r["mfu_percent"] = mfu(sps, training_flops_per_sample(config, width), info["peak_tflops"]) if sps else None
    if train.get("trainer", {}).get("samples_per_second"):
        for name, r in train.items():
            if r.get("samples_per_second"):
                r["ratio_to_trainer"] = r["samples_per_second"] / train["trainer"]["samples_per_second"]

    evaluation: dict = {}
    if "eval" not in a.skip:
        spec = {**common, "batch": a.eval_batch, "generation_max_length": a.generation_max_length,
                "torch_compile": a.torch_compile, "out": str(b.tmp / "trainer-eval")}
        evaluation["ours"] = b.worker("ours_eval", spec)
        evaluation["trainer"] = b.worker("trainer_eval", spec)
        ours, theirs = evaluation["ours"], evaluation["trainer"]
        if "predictions" in ours and "predictions" in theirs:
            same = [k for k in ours["predictions"] if theirs["predictions"].get(k) == ours["predictions"][k]]
            differ = [k for k in ours["predictions"] if k not in same]
            evaluation["compared"] = len(ours["predictions"])
            evaluation["identical_transcripts"] = len(same)
            evaluation["nonempty_transcripts"] = sum(bool(t) for t in ours["predictions"].values())
            evaluation["first_differences"] = [{"id": k, "ours": ours["predictions"][k][:120],
                                                "trainer": theirs["predictions"].get(k, "")[:120]} for k in differ[:3]]
            evaluation["speedup"] = theirs["seconds"] / ours["seconds"]
            evaluation["speedup_first_pass"] = theirs["seconds_first_pass"] / ours["seconds_first_pass"]
            for r in (ours, theirs):
                r["samples_per_second"] = r["samples"] / r["seconds"]
                del r["predictions"]
    return {"model": a.model, "shape": dict(zip(("d_model", "layers", "heads", "ffn_dim", "num_mel_bins", "vocab_size"),
                                                SHAPES[a.model])),
            "parameters_millions": round(count_parameters(config) / 1e6, 1),
            "label_tokens_mean": round(tokens, 2), "label_tokens_max": longest,
            "flops_per_training_sample": per_sample, "train": train, "eval": evaluation}


def count_parameters(config) -> int:
    from transformers import WhisperForConditionalGeneration

    import torch
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    seen = {id(p): p.numel() for p in model.parameters()}  # the tied output projection counted once
    return sum(seen.values())


def memory_table(b: Bench, a) -> list[dict]:
    rows = []
    for shape in a.memory_models:
        model_dir = build_model(shape, b.tmp / f"model-{shape}", b.texts)
        for checkpointing in ("false", "encoder", "true"):
            r = b.ours_train(model_dir, b.data, b.n_train, shape, a.batch, a.precision, checkpointing,
                             a.memory_steps, a.memory_steps // 2)
            rows.append({"model": shape, "gradient_checkpointing": checkpointing, "batch": a.batch,
                         "precision": a.precision, "samples_per_second": r.get("samples_per_second"),
                         "peak_gpu_memory_gb": r.get("peak_gpu_memory_gb"), "error": r.get("error")})
            say(f"    {shape} checkpointing {checkpointing}: " + (r.get("error") or
                f"{r['samples_per_second']:.1f} samples/s, peak {r['peak_gpu_memory_gb'] or 0:.1f} GiB"))
        shutil.rmtree(model_dir, ignore_errors=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"device: {result['device_name']} (bf16 dense peak {result['peak_tflops'] or 'unknown'} TFLOPS); "
             f"torch {result['torch']}, transformers {result['transformers']}"]
    s = result["settings"]
    lines.append(f"settings: {s}")
    run = result.get("run")
    if run:
        lines += ["", f"training, whisper-{run['model']} shape ({run['parameters_millions']} M parameters), "
                  f"{run['label_tokens_mean']} label tokens/sample, {run['flops_per_training_sample'] / 1e12:.3f} "
                  "TFLOP/sample", "", "| what | samples/s | x Trainer | MFU % | peak GiB |", "|---|---|---|---|---|"]
        for name, r in run["train"].items():
            if r.get("error"):
                lines.append(f"| {name} | {r['error']} | | | |")
                continue
            if r.get("profiled_steps"):
                name += f" (steps {r['profiled_steps']} profiled: {r['profile']}/profile.md)"
            lines.append(f"| {name} | {fmt(r.get('samples_per_second'))} | {fmt(r.get('ratio_to_trainer'), 2)} | "
                         f"{fmt(r.get('mfu_percent'))} | {fmt(r.get('peak_gpu_memory_gb'))} |")
        ev = run["eval"]
        if ev.get("ours") and ev.get("trainer"):
            lines += ["", "| evaluation | seconds (2nd pass) | 1st pass | samples/s | peak GiB |", "|---|---|---|---|---|"]
            for name in ("ours", "trainer"):
                r = ev[name]
                if r.get("error"):
                    lines.append(f"| {name} | {r['error']} | | | |")
                    continue
                lines.append(f"| {name} | {fmt(r['seconds'])} | {fmt(r['seconds_first_pass'])} | "
                             f"{fmt(r['samples_per_second'])} | {fmt(r.get('peak_gpu_memory_gb'))} |")
            if "speedup" in ev:
                lines.append(f"\nevaluation speed-up {ev['speedup']:.2f}x (first pass {ev['speedup_first_pass']:.2f}x); "
                             f"identical transcripts {ev['identical_transcripts']}/{ev['compared']}")
    if result.get("memory_table"):
        lines += ["", "| model | gradient_checkpointing | batch | precision | samples/s | peak GiB |",
                  "|---|---|---|---|---|---|"]
        for r in result["memory_table"]:
            lines.append(f"| {r['model']} | {r['gradient_checkpointing']} | {r['batch']} | {r['precision']} | "
                         f"{r['error'] or fmt(r['samples_per_second'])} | {fmt(r['peak_gpu_memory_gb'])} |")
    return "\n".join(lines)


def fmt(x, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=list(SHAPES), help="Whisper shape (random weights)")
    p.add_argument("--batch", type=int, default=None, help="per-device train batch (default 32; 16 with --guide)")
    p.add_argument("--eval-batch", type=int, default=None, help="eval batch of both sides (default: --batch)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="default bf16 where supported, else fp16; fp32 on CPU")
    p.add_argument("--gradient-checkpointing", choices=("false", "encoder", "true"), default=None,
                   help="default false (true with --guide)")
    p.add_argument("--guide", action="store_true", help="the guide's settings: fp16, batch 16, checkpointing on, "
                                                        "2 workers")
    p.add_argument("--torch-compile", choices=("auto", "true", "false"), default="auto", help="ours' torch_compile")
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--log-every", type=int, default=10, help="logging window; the first is warmup, not timed")
    p.add_argument("--workers", type=int, default=None, help="dataloader workers of both (default 6, 2 with --guide)")
    p.add_argument("--train-rows", type=int, default=528, help="rows of the training manifest (clips repeated)")
    p.add_argument("--eval-samples", type=int, default=132, help="rows of the evaluation manifest")
    p.add_argument("--generation-max-length", type=int, default=225)
    p.add_argument("--skip", nargs="*", default=[], choices=("train", "trainer", "ceiling", "eval"))
    p.add_argument("--memory-table", action="store_true",
                   help="only the memory table: --memory-models x checkpointing false/encoder/true, ours only")
    p.add_argument("--memory-models", nargs="+", default=["small", "medium", "large-v3"], choices=list(SHAPES))
    p.add_argument("--memory-steps", type=int, default=10)
    p.add_argument("--profile", default="", metavar="DIR",
                   help="profile ours' last steps (bench/profile_loop.py): DIR/profile.md and profile.json")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: hide CUDA (the smoke test)")
    p.add_argument("--compile-ceiling-on-cpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default="", help="also write the JSON result here")
    p.add_argument("--keep", default="", help="keep models, manifests and logs in this folder")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    if a.worker:
        spec = json.loads(Path(a.worker[1]).read_text(encoding="utf-8"))
        result = WORKERS[a.worker[0]](spec)
        Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
        return 0
    if a.steps <= a.log_every or a.steps % a.log_every:
        p.error("--steps must be a multiple of --log-every and larger than it")
    a.profile = str(Path(a.profile).resolve()) if a.profile else ""  # the runs' working directory is ROOT

    import transformers  # its version only; torch and CUDA are initialised in the workers

    holder = None if a.keep else tempfile.TemporaryDirectory(prefix="bench-gpu-")
    tmp = Path(a.keep or holder.name).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        b = Bench(a, tmp)
        info = b.worker("probe", {})
        if a.device == "auto" and not info["cuda"]:
            say("no CUDA device found: running on CPU (use --device cpu to say so)")
            a.device = "cpu"
        a.batch = a.batch or (16 if a.guide else 32)
        a.eval_batch = a.eval_batch or a.batch
        a.workers = a.workers if a.workers is not None else (2 if a.guide else 6)
        a.gradient_checkpointing = a.gradient_checkpointing or ("true" if a.guide else "false")
        a.precision = a.precision or ("fp32" if a.device == "cpu" else "fp16" if a.guide or not info["bf16_supported"]
                                      else "bf16")
        b.n_train, b.texts = write_data(tmp / "data", a.train_rows, a.eval_samples)
        b.data = tmp / "data"
        started = time.perf_counter()
        result = {"device_name": info["device_name"], "peak_tflops": info["peak_tflops"], "torch": info["torch"],
                  "transformers": transformers.__version__,
                  "settings": {k: getattr(a, k) for k in ("model", "batch", "eval_batch", "precision",
                                                          "gradient_checkpointing", "torch_compile", "steps",
                                                          "log_every", "workers", "train_rows", "eval_samples",
                                                          "generation_max_length", "device")},
                  "flops_formula": "per sample: 3 x forward matmul FLOPs (2 m n k each): convolutions over 3000/1500 "
                                   "frames, per layer projections + MLP + attention over 1500 encoder frames and T "
                                   "decoder tokens (T = mean label tokens), cross-attention, output projection "
                                   "(whisper_ft.speed.training_flops_per_sample); checkpointing recompute not counted",
                  "mfu_peak_source": "whisper_ft.speed.PEAK_TFLOPS (dense bf16, by device name)"}
        if a.memory_table:
            result["memory_table"] = memory_table(b, a)
        else:
            result["run"] = train_and_eval(b, a, info)
        result["bench_seconds"] = round(time.perf_counter() - started, 1)
        text = json.dumps(result, indent=1)
        if a.json:
            Path(a.json).write_text(text, encoding="utf-8")
        say("\n" + markdown(result))
        print(text)
    finally:
        if holder is not None:
            holder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
