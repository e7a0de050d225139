"""Evaluate any Whisper on the configured dataset: WER, CER, orthographic WER, and every prediction.

    python -m whisper_ft.evaluate --config config.yaml [--model DIR_OR_HUB_ID] [--split test]
    accelerate launch -m whisper_ft.evaluate --config config.yaml --model openai/whisper-small   # several GPUs

--model is a model folder, a Hub id, or a checkpoint-<step>/ folder of a run (its training state).
Without it: the final model in checkpoint_dir when the run has exported one, else the base model
(whisper_pretrained), which gives the zero-shot baseline. Every training-config flag works here too
(--lang, --max-eval-samples, --per-device-eval-batch-size, --generation-max-length, ...).

Writes, under --output-dir (default <checkpoint_dir>/eval/<model>-<split>/):
  predictions.jsonl  one object per evaluated sample: id, reference, prediction, wer (normalised, %)
  summary.json       model, data, language, metrics, skipped samples
Each sample is evaluated by exactly one process and counted once (whisper_ft.evaluation).

Long-form check (one process), before and after fine-tuning, of what short clips cannot show:

    python -m whisper_ft.evaluate --config config.yaml --long-form DATA [--split test] [--long-form-minutes 3]
    python -m whisper_ft.evaluate --config config.yaml --long-form talk.mp3 --model openai/whisper-small

DATA is a dataset (Common Voice folder, manifest, Hub id): its clips are joined, 0.5 s of silence apart,
into recordings of about --long-form-minutes; an audio file with <name>.txt beside it (or a folder of
such pairs) is used as it is. Each is transcribed with timestamps, window after window, as
whisper_ft.transcribe does; long_form.json (default <checkpoint_dir>/eval/<model>-long-form/) holds the
WER of the whole transcripts, the segment count, whether every segment lies inside its audio and how
many segments start without a space (glued sentences), with every segment per recording.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from whisper_ft.config import ConfigError, load_config

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our own flags; everything else goes to the training config parser (which rejects unknown ones)."""
    p = argparse.ArgumentParser(prog="python -m whisper_ft.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", default="", help="model folder, Hub id or checkpoint-<step> folder (see above)")
    p.add_argument("--split", default="", help="split(s) to evaluate; default: eval_split of the config")
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
        return EXIT_CONFIG
    from whisper_ft.checkpoint import CheckpointError
    from whisper_ft.data import DataError
    from whisper_ft.model import ModelError

    try:
        return run(cfg, args)
    except (DataError, ModelError, CheckpointError) as e:
        print(f"whisper-ft evaluate: {e}", file=sys.stderr)
        return EXIT_ERROR


def run(cfg, args) -> int:
    if args.long_form:
        from whisper_ft import long_form

        model_ref, label = choose_model(args.model, cfg)
        return long_form.run(cfg, args, model_ref, label, lambda m: print(m, file=sys.stderr, flush=True))
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from whisper_ft import batches, speed
    from whisper_ft import run as run_parts
    from whisper_ft.collate import Collator
    from whisper_ft.data import DataError, Prepare
    from whisper_ft.sources import load_records
    from whisper_ft.evaluation import evaluate
    from whisper_ft.languages import resolve
    from whisper_ft.model import generate_kwargs

    accelerator = Accelerator(mixed_precision=run_parts.mixed_precision(cfg),
                              dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False))
    say = run_parts.Reporter(accelerator)
    lang = resolve(cfg.lang)
    split = args.split or cfg.eval_split
    model_ref, label = choose_model(args.model, cfg)
    say(f"evaluating {model_ref} ({label}) on {cfg.dataset_name} split {split!r}, {lang.name}, "
        f"{accelerator.num_processes} process(es)")
    processor, model = load_any(model_ref, cfg, lang)
    model.to(accelerator.device)

    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    records = load_records(cfg.dataset_name, split, lang=lang, text_column=cfg.text_column,
                           audio_column=cfg.audio_column, dataset_config=cfg.dataset_config,
                           revision=cfg.dataset_revision, cache_dir=cfg.dataset_cache, token=cfg.hf_token)
    if cfg.max_eval_samples and cfg.max_eval_samples < len(records):
        records = [records[i] for i in range(cfg.max_eval_samples)]
    if not len(records):
        raise DataError(f"{cfg.dataset_name} split {split!r} has no samples")
    # Unusable samples (empty or over-long transcript, unreadable audio, over 30 s) are not filtered here:
    # Prepare turns each into a Bad, which evaluate() returns; they are counted and named in the summary.
    loader = batches.eval_loader(records, prepare, Collator(model.config.decoder_start_token_id), cfg,
                                 accelerator.process_index, accelerator.num_processes)
    start = time.perf_counter()
    metrics, rows, bad = evaluate(model, loader, processor.tokenizer, accelerator,
                                  generate_kwargs={**generate_kwargs(model, cfg.generation_max_length),
                                                   **speed.generation_speedups(speed.compile_wanted(cfg.torch_compile))})
    seconds = time.perf_counter() - start

    out = Path(args.output_dir) if args.output_dir else default_output_dir(cfg, model_ref, label, split)
    if accelerator.is_main_process:
        summary = {
            "model": model_ref, "model_kind": label, "dataset": cfg.dataset_name, "dataset_config": cfg.dataset_config,
            "split": split, "language": lang.code, "task": cfg.task, "processes": accelerator.num_processes,
            "generation_max_length": cfg.generation_max_length, "seconds": round(seconds, 2),
            "metrics": metrics, "skipped_samples": len(bad), "skipped_by_reason": dict(Counter(b.reason for b in bad)),
            "skipped": [{"id": b.id, "reason": b.reason, "detail": b.detail} for b in bad[:50]],
        }
        write_outputs(out, rows, summary)
        say(f"{len(rows)} samples: " + ", ".join(f"{k[5:]} {metrics[k]:.2f}" for k in
                                                 ("eval_wer", "eval_cer", "eval_wer_ortho") if k in metrics))
        if bad:
            reasons = ", ".join(f"{n} {r}" for r, n in summary["skipped_by_reason"].items())
            say(f"skipped {len(bad)} unusable samples ({reasons}); first: "
                + "; ".join(f"{b.id} ({b.reason})" for b in bad[:3]))
        say(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return EXIT_OK


def choose_model(arg: str, cfg) -> tuple[str, str]:
    """(what to load, what it is): an explicit --model, else the run's final model, else the base model."""
    if arg:
        if arg == cfg.whisper_pretrained:
            return arg, "base"
        return arg, "checkpoint" if is_training_checkpoint(Path(arg)) else "model"
    final = Path(cfg.checkpoint_dir)
    if (final / "config.json").is_file():
        return str(final), "fine-tuned"
    return cfg.whisper_pretrained, "base"


def is_training_checkpoint(path: Path) -> bool:
    """A checkpoint-<step>/ folder: accelerate's save_state, with no config.json beside the weights."""
    return path.is_dir() and (path / "trainer_state.json").is_file() and not (path / "config.json").is_file()


def load_any(ref: str, cfg, lang):
    """(processor, model) with the config's language and task, from a model folder, Hub id or checkpoint."""
    from whisper_ft.model import ModelError, load_whisper

    path = Path(ref)
    if not path.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
        # A path that is not there: say so, rather than let the Hub client reject it as a malformed repo id.
        raise ModelError(f"could not load Whisper from {ref!r}: no such folder")
    if not is_training_checkpoint(path):
        return load_whisper(ref, lang, cfg.task, cache_dir=cfg.model_cache, token=cfg.hf_token)
    return load_training_checkpoint(path, cfg, lang)


def load_training_checkpoint(path: Path, cfg, lang):
    """The architecture and processor of the run's base model, with the checkpoint's weights.

    save_state writes the raw state dict, where safetensors dropped proj_out.weight (tied to the decoder
    embeddings, DESIGN pitfall 10): load non-strictly, allow only tied keys to be missing, then re-tie.
    """
    import torch
    from safetensors.torch import load_file

    from whisper_ft.model import ModelError, load_whisper

    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    base = state.get("config", {}).get("whisper_pretrained") or cfg.whisper_pretrained
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{path} has no model.safetensors (sharded FSDP/DeepSpeed state?); export a model folder "
                         "from it first, or evaluate the run's final model folder")
    processor, model = load_whisper(base, lang, cfg.task, cache_dir=cfg.model_cache, token=cfg.hf_token)
    tensors = load_file(str(weights))
    tensors = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False)
    tied = {"proj_out.weight"}
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ModelError(f"{weights} does not match the architecture of {base}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
    if not torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight):
        raise ModelError(f"proj_out is not tied to the decoder embeddings after loading {weights}")
    return processor, model


def default_output_dir(cfg, model_ref: str, label: str, split: str) -> Path:
    name = "base" if label == "base" else "final" if label == "fine-tuned" else Path(model_ref.rstrip("/")).name
    return Path(cfg.checkpoint_dir) / "eval" / f"{_safe(name)}-{_safe(split)}"


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("_") or "model"


def write_outputs(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import jiwer

    from whisper_ft.evaluation import normalize

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            ref, pred = normalize(row["reference"]), normalize(row["prediction"])
            # Per-sample WER makes the worst samples easy to find; empty references have none (pitfall 8).
            wer = round(100 * jiwer.wer(ref, pred), 2) if ref else None
            f.write(json.dumps({**row, "wer": wer}, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
