"""Check a dataset before training: broken, mislabelled and odd samples, and what a run will cost.

    python -m whisper_ft.cli.inspect --config config.yaml [--with-model [MODEL]] [--output-dir DIR] [--max-samples N]
    whisper-ft inspect --config config.yaml --with-model

Reads the config's training split and evaluation sets through the training loop's own code (the same sources,
columns, caps and checks), then looks at every sample: the loop's skip reason, duration, sample rate, loudness,
clipping, speech share, transcript length, speaking rate, script, digits vs number words, duplicates and
train/eval overlap. With --with-model (default model: the config's whisper_pretrained) each sample is also
transcribed greedily and the given transcript scored by the model, so that mislabelled samples come first.
Writes report.json, report.md and PNG plots to --output-dir (default <checkpoint_dir>/inspect) and prints a
short summary. Every reason is explained in docs/inspect.md.

Exit code 0: training would accept the data (the findings are still worth a look). 2: training would refuse
it (the same rules as the loop: no usable sample, missing audio, the unusable share over
max_bad_sample_fraction), or the configuration is wrong. 1: a model or source that cannot be read at all.
Every training-config flag works here too (--dataset-name, --train-split, --lang, ...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from whisper_ft.config import ConfigError, load_config
from whisper_ft.exit_codes import Exit


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m whisper_ft.cli.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--with-model", nargs="?", const="", default=None, metavar="MODEL",
                   help="also transcribe and score every sample with MODEL (folder or Hub id; "
                        "default: whisper_pretrained)")
    p.add_argument("--output-dir", default="", help="where report.json, report.md and the plots go "
                                                    "(default <checkpoint_dir>/inspect)")
    p.add_argument("--max-samples", type=int, default=0, help="inspect at most this many samples per split (0 = all)")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.max_samples < 0:
        p.error("--max-samples must be 0 or more")
    return args, rest


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    try:
        cfg = load_config(rest)
    except ConfigError as e:
        print(f"whisper-ft inspect: the configuration has problems:\n{e}", file=sys.stderr)
        return Exit.CONFIG
    from whisper_ft.data import DataError
    from whisper_ft.model import ModelError

    try:
        return run(cfg, args)
    except (DataError, ModelError) as e:
        print(f"whisper-ft inspect: {e}", file=sys.stderr)
        return Exit.ERROR


def base_processor(cfg, lang):
    """The base model's feature extractor and tokenizer, with the prefix tokens training uses, without its weights."""
    from transformers import WhisperProcessor

    from whisper_ft.model import from_pretrained

    processor = from_pretrained(WhisperProcessor, cfg.whisper_pretrained, cache_dir=cfg.model_cache or None,
                                token=cfg.hf_token or None)
    multilingual = lang.token in processor.tokenizer.get_vocab()
    processor.tokenizer.set_prefix_tokens(language=lang.code if multilingual else None,
                                          task=cfg.task if multilingual else None)
    return processor


def run(cfg, args) -> int:
    from whisper_ft.data import Prepare
    from whisper_ft.doctor import cost, plots, ranking, report, survey, text
    from whisper_ft.languages import resolve

    lang = resolve(cfg.lang)
    model = processor = None
    model_ref = None if args.with_model is None else (args.with_model or cfg.whisper_pretrained)
    if model_ref:
        from whisper_ft.model import load_any

        processor, model = load_any(model_ref, cfg, lang)
    base = processor if model_ref == cfg.whisper_pretrained else base_processor(cfg, lang)
    prepare = Prepare(base.feature_extractor, base.tokenizer, timestamp_probability=cfg.timestamp_probability,
                      seed=cfg.seed)
    loaded = survey.load(cfg, lang, prepare, args.max_samples)
    say(f"inspecting {cfg.dataset_name}: " + ", ".join(f"{n} {len(r)} samples" for n, r in loaded.splits.items()))
    samples = [x for name, records in loaded.splits.items() for x in survey.survey(name, records, prepare)]
    train = [x for x in samples if x["split"] == "train"]
    evals = [x for x in samples if x["split"] != "train"]

    found = []
    scripts, script_summary = text.script_findings(samples)
    numbers, number_summary = text.number_findings(samples, lang.code)
    overlap, overlap_summary = text.overlap_findings(train, evals)
    rates, rate_limits = text.rate_findings([x for x in samples if not x["skipped"]])
    found += [scripts, numbers, text.duplicate_findings(samples), overlap, rates]
    for findings in found:
        for x in samples:
            x["reasons"] += findings.get(x["key"], [])

    model_report = None
    if model is not None:
        from whisper_ft.doctor.scoring import score

        skipped = {x["key"] for x in samples if x["skipped"]}  # training never sees them: nothing to score
        usable = {name: [r for r in records if (name, r.id) not in skipped] for name, records in loaded.splits.items()}
        start = time.perf_counter()
        scores, per_split = score(model, processor, usable, cfg, say)
        seconds = time.perf_counter() - start
        thresholds = ranking.add_model_findings(samples, scores)
        n = sum(len(r) for r in usable.values())
        model_report = {"name": model_ref, "wer_per_split": per_split, "thresholds": thresholds, "samples": n,
                        "seconds": round(seconds, 1), "seconds_per_100_samples": round(100 * seconds / max(1, n), 1),
                        "device": "a GPU" if next(model.parameters()).is_cuda else "the CPU"}

    suspicious = ranking.suspicious(samples)
    verdict = judge(cfg, loaded, train)
    usable_train = [x for x in train if not x["skipped"]]
    estimate = cost.estimate(cfg, len(usable_train), sum(x["seconds"] for x in usable_train) / 3600)
    out = Path(args.output_dir or Path(cfg.checkpoint_dir) / "inspect")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "verdict": verdict,
        "data": {"dataset_name": str(cfg.dataset_name), "train_split": cfg.train_split,
                 "eval_sets": [n for n in loaded.splits if n != "train"], "language": lang.code,
                 "max_samples_per_split": args.max_samples or None},
        "splits": {name: report.split_summary([x for x in samples if x["split"] == name]) for name in loaded.splits},
        "text": {"scripts": script_summary, "numbers": number_summary, "habits": text.habits(samples),
                 "split_words": text.split_words(samples, base.tokenizer)},
        "overlap": overlap_summary, "speaking_rate_limits": rate_limits,
        "model": model_report,
        "cost": {**estimate, "sentence": cost.sentence(estimate)},
        "findings": report.findings(samples),
        "suspicious_samples": [report.sample_entry(x) for x in suspicious],
        "loader_messages": loaded.messages,
    }
    result["plots"] = plots.draw(samples, rate_limits, out)
    report.write(out, result)
    print(report.console(result, out))
    return verdict["exit_code"]


def judge(cfg, loaded, train: list[dict]) -> dict:
    """Would training accept the data? load_data's refusal, or the loop's bad-share rule over every sample."""
    from whisper_ft.stopping import bad_share_surely_over

    reasons = list(loaded.refused)
    skipped = [x for x in train if x["skipped"]]
    if not reasons and bad_share_surely_over(len(skipped), len(train), cfg.max_bad_sample_fraction):
        reasons.append(f"{len(skipped)} of {len(train)} training samples are unusable, surely more than "
                       f"max_bad_sample_fraction {cfg.max_bad_sample_fraction}: the run would stop part-way")
    return {"usable": not reasons, "exit_code": int(Exit.CONFIG if reasons else Exit.OK), "reasons": reasons}


if __name__ == "__main__":
    sys.exit(main())
