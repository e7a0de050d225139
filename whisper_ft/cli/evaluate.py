"""Evaluate any Whisper on the configured dataset: WER, CER, orthographic WER, and every prediction.

    python -m whisper_ft.cli.evaluate --config config.yaml [--model DIR_OR_HUB_ID] [--split test]
    accelerate launch -m whisper_ft.cli.evaluate --config config.yaml --model openai/whisper-small   # several GPUs

--model is a model folder, a Hub id, or a checkpoint-<step>/ folder of a run (its training state).
Without it: the final model in checkpoint_dir when the run has exported one, else the base model
(whisper_pretrained), which gives the zero-shot baseline. Every training-config flag works here too
(--lang, --max-eval-samples, --per-device-eval-batch-size, --generation-max-length, ...).

Without --split, every set of the config's eval_sets is evaluated (as training evaluated them), else its
eval_split. Writes, for each, under --output-dir (default <checkpoint_dir>/eval/<model>-<split or set>/;
with several sets, a folder per set inside --output-dir):
  predictions.jsonl  one object per evaluated sample: id, reference, prediction, wer (normalised, %)
  summary.json       model, data, language, metrics, skipped samples
Each sample is evaluated by exactly one process and counted once (whisper_ft.evaluation).

Long-form check (one process), before and after fine-tuning, of what short clips cannot show:

    python -m whisper_ft.cli.evaluate --config config.yaml --long-form DATA [--split test] [--long-form-minutes 3]
    python -m whisper_ft.cli.evaluate --config config.yaml --long-form talk.mp3 --model openai/whisper-small

DATA is a dataset (Common Voice folder, manifest, Hub id): its clips are joined, 0.5 s of silence apart,
into recordings of about --long-form-minutes; an audio file with <name>.txt beside it (or a folder of
such pairs) is used as it is. Each is transcribed with timestamps, window after window, as
whisper_ft.cli.transcribe does; long_form.json (default <checkpoint_dir>/eval/<model>-long-form/) holds the
WER of the whole transcripts, the segment count, whether every segment lies inside its audio and how
many segments start without a space (glued sentences), with every segment per recording.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from whisper_ft.config import ConfigError, load_config

from whisper_ft.exit_codes import Exit


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our own flags; everything else goes to the training config parser (which rejects unknown ones)."""
    p = argparse.ArgumentParser(prog="python -m whisper_ft.cli.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", default="", help="model folder, Hub id or checkpoint-<step> folder (see above)")
    p.add_argument("--split", default="", help="split of the config's dataset to evaluate; default: the config's "
                                               "eval_sets, else its eval_split")
    p.add_argument("--output-dir", default="", help="where predictions.jsonl and summary.json (or long_form.json) go")
    p.add_argument("--long-form", default="", metavar="DATA_OR_AUDIO",
                   help="long-form check instead: a dataset whose clips are joined, or audio with a .txt beside it")
    p.add_argument("--long-form-minutes", type=float, default=3.0, help="length of each joined recording (default 3)")
    # allow_abbrev=False: --model must not swallow the config's --model-name / --model-cache.
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.long_form_minutes <= 0:
        p.error("--long-form-minutes must be above 0")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    try:
        cfg = load_config(rest)
    except ConfigError as e:
        print(f"whisper-ft evaluate: the configuration has problems:\n{e}", file=sys.stderr)
        return Exit.CONFIG
    from whisper_ft.checkpoint import CheckpointError
    from whisper_ft.data import DataError
    from whisper_ft.model import ModelError

    try:
        return run(cfg, args)
    except (DataError, ModelError, CheckpointError) as e:
        print(f"whisper-ft evaluate: {e}", file=sys.stderr)
        return Exit.ERROR


def run(cfg, args) -> int:
    if args.long_form:
        model_ref, label = choose_model(args.model, cfg)
        return run_long_form(cfg, args, model_ref, label, lambda m: print(m, file=sys.stderr, flush=True))
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from whisper_ft import batches, speed
    from whisper_ft.device import mixed_precision
    from whisper_ft.reporting import Reporter
    from whisper_ft.collate import Collator
    from whisper_ft.data import DataError, Prepare, name_first, reasons
    from whisper_ft.sources import load_records
    from whisper_ft.evaluation import evaluate
    from whisper_ft.languages import resolve
    from whisper_ft.model import generate_kwargs, load_any

    accelerator = Accelerator(mixed_precision=mixed_precision(cfg),
                              dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False))
    say = Reporter(accelerator)
    lang = resolve(cfg.lang)
    sets = evaluation_sets(cfg, args.split)
    model_ref, label = choose_model(args.model, cfg)
    say(f"evaluating {model_ref} ({label}) on " + "; ".join(f"{s['dataset_name']} split {s['split']!r}"
                                                            for s in sets.values())
        + f", {lang.name}, {accelerator.num_processes} process(es)")
    processor, model = load_any(model_ref, cfg, lang)
    model.to(accelerator.device)
    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    kwargs = {**generate_kwargs(model, cfg.generation_max_length),
              **speed.generation_speedups(speed.compile_wanted(cfg.torch_compile))}
    outs = {name: default_output_dir(cfg, model_ref, label, name) if not args.output_dir else
            Path(args.output_dir) / (_safe(name) if len(sets) > 1 else "") for name in sets}
    # Checked by every process before any writes: after, a process could read the main process's
    # half-written summary.json and refuse (DESIGN: one writer, checks before the first write).
    for out in outs.values():
        check_output_dir(out)

    for name, spec in sets.items():
        records = load_records(spec["dataset_name"], spec["split"], lang=lang, text_column=spec["text_column"],
                               audio_column=spec["audio_column"], dataset_config=spec["dataset_config"],
                               revision=spec["dataset_revision"], cache_dir=cfg.dataset_cache, token=cfg.hf_token)
        if cfg.max_eval_samples and cfg.max_eval_samples < len(records):
            records = [records[i] for i in range(cfg.max_eval_samples)]
        if not len(records):
            raise DataError(f"{spec['dataset_name']} split {spec['split']!r} has no samples")
        # Unusable samples (empty or over-long transcript, unreadable audio, over 30 s) are not filtered here:
        # Prepare turns each into a Bad, which evaluate() returns; they are counted and named in the summary.
        loader = batches.eval_loader(records, prepare, Collator(model.config.decoder_start_token_id), cfg,
                                     accelerator.process_index, accelerator.num_processes)
        start = time.perf_counter()
        metrics, rows, bad = evaluate(model, loader, processor.tokenizer, accelerator, generate_kwargs=kwargs)
        seconds = time.perf_counter() - start
        if not rows:  # a loss of 0.00 over 0 samples is not a result
            raise DataError(f"{spec['dataset_name']} split {spec['split']!r} is unusable: none of its {len(records)} "
                            f"samples could be evaluated ({reasons(bad) if bad else 'no samples'}; first: "
                            f"{name_first(bad, 3) if bad else '-'}); nothing was written")

        out = outs[name]
        if accelerator.is_main_process:
            summary = {
                "model": model_ref, "model_kind": label, "eval_set": name, "dataset": spec["dataset_name"],
                "dataset_config": spec["dataset_config"], "split": spec["split"], "language": lang.code,
                "task": cfg.task, "processes": accelerator.num_processes,
                "generation_max_length": cfg.generation_max_length, "seconds": round(seconds, 2),
                "metrics": metrics, "skipped_samples": len(bad),
                "skipped_by_reason": dict(Counter(b.reason for b in bad)),
                "skipped": [{"id": b.id, "reason": b.reason, "detail": b.detail} for b in bad[:50]],
            }
            write_outputs(out, rows, summary)
            say((f"{name}: " if len(sets) > 1 else "") + f"{len(rows)} samples: " + ", ".join(
                f"{k[5:]} {metrics[k]:.2f}" for k in ("eval_wer", "eval_cer", "eval_wer_ortho") if k in metrics))
            if bad:
                say(f"skipped {len(bad)} unusable samples ({reasons(bad)}); first: {name_first(bad, 3)}")
            say(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return Exit.OK


def run_long_form(cfg, args, model_ref: str, label: str, say) -> int:
    """evaluate --long-form: build the recordings, transcribe them, write long_form.json and print the summary."""
    import torch

    from whisper_ft.data import DataError, Prepare
    from whisper_ft.languages import resolve
    from whisper_ft.long_form import check, is_recording_folder, join_clips, recordings_from_files
    from whisper_ft.model import is_multilingual, load_any
    from whisper_ft.sources import load_records

    lang = resolve(cfg.lang)
    source = Path(args.long_form).expanduser()
    processor, model = load_any(model_ref, cfg, lang)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" and (cfg.fp16 or cfg.bf16) else torch.float32
    model.to(device, dtype).eval()
    split = args.split or cfg.eval_split
    if is_recording_folder(source):
        recordings, skipped, what = recordings_from_files(source), 0, str(source)
    else:
        records = load_records(args.long_form, split, lang=lang, text_column=cfg.text_column,
                               audio_column=cfg.audio_column, dataset_config=cfg.dataset_config,
                               revision=cfg.dataset_revision, cache_dir=cfg.dataset_cache, token=cfg.hf_token)
        records = records[: cfg.max_eval_samples or None]
        prepare = Prepare(processor.feature_extractor, processor.tokenizer)
        recordings, skipped = join_clips(records, prepare, args.long_form_minutes, spaces=lang.uses_spaces)
        what = f"{args.long_form} split {split!r}, clips joined into recordings of about {args.long_form_minutes} min"
    if not recordings:
        raise DataError(f"no usable audio in {args.long_form}" + (f" ({skipped} clips unusable)" if skipped else ""))
    say(f"long-form check of {model_ref} ({label}) on {what}: {len(recordings)} recording(s)")
    kwargs = {"language": model.generation_config.language, "task": model.generation_config.task} \
        if is_multilingual(model) else {}
    report = {"model": model_ref, "model_kind": label, "source": str(args.long_form), "language": lang.code,
              "clips_skipped": skipped,
              **check(model, processor, recordings, kwargs, device, dtype, spaces=lang.uses_spaces)}
    out = Path(args.output_dir) if args.output_dir else default_output_dir(cfg, model_ref, label, "long-form")
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_form.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    name, key = ("WER", "long_form_wer") if lang.uses_spaces else ("CER", "long_form_cer")  # CER: no spaces
    value = "n/a" if report[key] is None else f"{report[key]:.2f}"
    say(f"long-form {name} {value} over {report['audio_seconds']:.0f} s; {report['segments']} segments, "
        + ("all inside the audio" if report["segments_inside_audio"] else
           f"{report['segments_outside_audio']} outside the audio")
        + (f"; {report['segments_without_leading_space']} starting without a space" if lang.uses_spaces else ""))
    say(f"wrote {out / 'long_form.json'}")
    return Exit.OK


def evaluation_sets(cfg, split_arg: str) -> dict[str, dict[str, str]]:
    """name -> {dataset_name, split, columns, ...}: --split on the config's dataset, else the config's
    eval_sets (each as training evaluated it), else its eval_split. A set is named by its split by default."""
    from whisper_ft.config import eval_set_specs

    if split_arg or not cfg.eval_sets:
        spec = eval_set_specs(dataclasses.replace(cfg, eval_sets={}))["eval"]
        return {split_arg or cfg.eval_split: {**spec, "split": split_arg or cfg.eval_split}}
    return eval_set_specs(cfg)


def choose_model(arg: str, cfg) -> tuple[str, str]:
    """(what to load, what it is): an explicit --model, else the run's final model, else the base model."""
    if arg:
        if arg == cfg.whisper_pretrained:
            return arg, "base"
        from whisper_ft.model import is_training_checkpoint

        return arg, "checkpoint" if is_training_checkpoint(Path(arg)) else "model"
    final = Path(cfg.checkpoint_dir)
    if (final / "config.json").is_file():
        return str(final), "fine-tuned"
    return cfg.whisper_pretrained, "base"


def default_output_dir(cfg, model_ref: str, label: str, split: str) -> Path:
    name = "base" if label == "base" else "final" if label == "fine-tuned" else Path(model_ref.rstrip("/")).name
    return Path(cfg.checkpoint_dir) / "eval" / f"{_safe(name)}-{_safe(split)}"


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("_") or "model"


def check_output_dir(out: Path) -> None:
    """predictions.jsonl and summary.json replace only an earlier evaluation's, never files of the same names that
    this command did not write (DataError)."""
    from whisper_ft.data import DataError

    summary = out / "summary.json"
    ours = False
    if summary.is_file():
        try:
            ours = {"model", "model_kind", "metrics"} <= set(json.loads(summary.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            ours = False
    if (summary.exists() or (out / "predictions.jsonl").exists()) and not ours:
        raise DataError(f"{out} already holds a summary.json or predictions.jsonl that an evaluation did not write; "
                        "evaluate would overwrite them. Give another --output-dir")
    if out.exists() and not out.is_dir():
        raise DataError(f"--output-dir {out} is a file, not a folder")


def write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import jiwer

    from whisper_ft.evaluation import normalize

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            ref, pred = normalize(row["reference"]), normalize(row["prediction"])
            # Per-sample WER makes the worst samples easy to find; empty references have none
            # (DESIGN: normaliser strips combining marks).
            wer = round(100 * jiwer.wer(ref, pred), 2) if ref else None
            f.write(json.dumps({**row, "wer": wer}, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
