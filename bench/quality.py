"""Does fine-tuning give a model that beats the base model everywhere a user checks? One table says.

    python bench/quality.py                                    # every recipe on both corpora, whisper-tiny.en
    python bench/quality.py --corpus travel --recipe base full frozen-encoder
    python bench/quality.py --model /work/real/whisper-tiny.en --steps 60 --set learning_rate=3e-5

For each corpus (bench/quality_corpus.py speaks it with espeak-ng into --cache the first time) and each
recipe (a name for a few config overrides, RECIPES below), it fine-tunes --model with the real entry point,
`python train_loop.py --config <yaml> <overrides>`, whose eval_sets report the three short-clip sets, then runs
`python -m whisper_ft.cli.evaluate --long-form` on the exported model. The `base` recipe evaluates --model
itself with the same two commands. The table gives the WER (normalised, %) on:

  domain   the domain's held-out sentences (same sentence shapes and voices, combinations never trained on)
  unseen   the domain's names in sentence shapes never trained on, spoken by a voice never trained on
  general  plain English the base model already handles, another voice never trained on
  long     the held-out clips joined into one multi-minute recording, transcribed window after window with
           timestamps (whisper_ft.long_form); beside it: segments outside the audio, segments that start
           without a space (glued sentences), and repeated phrases (4-word phrases the transcript has more
           often than the reference: a decoding loop)

Each row's results are kept in --work/<corpus>/<recipe>/result.json with the command that made them; rerunning
the bench reuses a row whose commands are unchanged (--fresh redoes it). Every row prints the command that
reproduces it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality_corpus  # noqa: E402

DEFAULT_MODEL = "/work/real/whisper-tiny.en"
SETS = ("domain", "unseen", "general")  # eval_sets names, in the config's order: the first is the domain's

# name -> config overrides on top of the bench's config (run_config). `learning_rate` and `max_steps` here win
# over --lr/--steps only where a recipe is about them. A recipe whose keys this checkout's Config lacks is
# skipped with a note, so the bench runs on a checkout that predates them.
RECIPES: dict[str, dict] = {
    "base": {},  # no training: the model as it is
    "full": {},  # full fine-tune at --lr for --steps
    "full-lr3e-5": {"learning_rate": 3e-5},
    "full-lr1e-5": {"learning_rate": 1e-5},
    "full-30steps": {"max_steps": 30},
    "frozen-encoder": {"freeze_encoder": True},
    "lora": {"lora_r": 16, "learning_rate": 1e-3},
    "merge": {"merge_base": True},
    "replay": {"replay_dataset": "{corpus}/replay", "replay_fraction": 0.25},
    "frozen-encoder-merge": {"freeze_encoder": True, "merge_base": True},
    "replay-merge": {"replay_dataset": "{corpus}/replay", "replay_fraction": 0.25, "merge_base": True},
}


def run_config(args, corpus_dir: Path, out: Path, steps: int) -> dict:
    """The settings every row shares: a small-data run on the CPU, evaluated on the three sets at its end."""
    return {
        "lang": "en", "model_name": Path(args.model).name, "whisper_pretrained": str(args.model),
        "dataset_name": str(corpus_dir), "train_split": "train", "eval_split": "heldout",
        "eval_sets": [{"name": name, "split": split} for name, split in zip(SETS, ("heldout", "unseen", "general"))],
        "checkpoint_dir": str(out),
        "per_device_train_batch_size": args.batch, "per_device_eval_batch_size": 20,
        "learning_rate": args.lr, "warmup_steps": max(1, steps // 10), "max_steps": steps,
        "eval_steps": steps, "save_steps": steps, "save_total_limit": 1, "logging_steps": max(1, steps // 6),
        "eval_at_start": False,  # the base row evaluates the base model once for every recipe (merge_base: below)
        "report_to": "none", "dataloader_num_workers": 1, "torch_compile": "false",
        "generation_max_length": 96, "seed": args.seed,
    }


def flags(overrides: dict) -> list[str]:
    """{"freeze_encoder": True, "lora_r": 16} -> ["--freeze-encoder", "--lora-r", "16"]: the config's own flags."""
    out = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def missing_keys(overrides: dict) -> list[str]:
    from whisper_ft.config import Config

    known = {f.name for f in dataclasses.fields(Config)}
    return [k for k in overrides if k not in known]


def run(cmd: list[str], log: Path) -> None:
    """One command, its output to `log`; a failure ends the bench with the log's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise SystemExit(f"quality: exit {code} from {shlex.join(cmd)}\n" + "\n".join(tail) + f"\n(log: {log})")


def repeated_phrases(reference: str, transcript: str, n: int = 4) -> int:
    """n-word phrases the transcript holds more often than the reference: what a decoding loop adds."""
    from whisper_ft.evaluation import normalize

    def grams(text):
        words = normalize(text).split()
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    ref = grams(reference)
    return sum(max(0, c - ref[g]) for g, c in grams(transcript).items() if c > 1)


def long_form(report: dict) -> dict:
    rows = report["per_recording"]
    return {"long": report["long_form_wer"], "long_seconds": report["audio_seconds"],
            "long_outside": report["segments_outside_audio"],
            "long_glued": report["segments_without_leading_space"],
            "long_repeats": sum(repeated_phrases(r["reference"], r["transcript"]) for r in rows)}


def after_training(out: Path) -> tuple[dict, dict | None]:
    """(WER per set of the exported model, WER per set at alpha 1 or None). With merge_base: the record that
    carries merge_alpha holds the exported alpha's metrics, and its merge_table the fine-tuned model's (alpha 1);
    without: the last evaluation, which (evaluating only at the end) is the exported model's."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_set = lambda r: {name: r[f"eval/{name}/wer"] for name in SETS}
    merged = [r for r in records if "merge_alpha" in r]
    if merged:
        record = merged[-1]
        tuned = next(row for row in record["merge_table"] if abs(row["alpha"] - 1.0) < 1e-9)
        return {**per_set(record), "alpha": record["merge_alpha"]}, {name: tuned[name] for name in SETS}
    return per_set([r for r in records if f"eval/{SETS[0]}/wer" in r][-1]), None


def cached(work: Path, command: list[str], config: Path, produce) -> dict:
    """produce()'s result for this command and config, kept in work/parts.json so an unchanged part is not rerun."""
    store = work / "parts.json"
    parts = json.loads(store.read_text()) if store.is_file() else {}
    key = shlex.join(command) + " | " + hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    if key not in parts:
        parts[key] = produce()
        store.write_text(json.dumps(parts, indent=1) + "\n", encoding="utf-8")
    return parts[key]


def measure(args, corpus: str, corpus_dir: Path, recipe: str) -> list[dict]:
    """The rows of one recipe: trained (unless base), the three sets, the long-form check; a merge_base recipe
    adds the row of its fine-tuned end (alpha 1, not exported: no long-form). [] when it cannot run here."""
    import shutil

    import yaml

    overrides = {k: (v.format(corpus=corpus_dir) if isinstance(v, str) else v) for k, v in RECIPES[recipe].items()}
    overrides.update(args.set)
    steps = int(overrides.pop("max_steps", args.steps))  # warmup, evaluation and saving follow the step count
    missing = missing_keys(overrides)
    if missing:
        print(f"quality: {corpus}/{recipe} skipped: this checkout's config has no {', '.join(missing)}", flush=True)
        return []
    work = args.work / corpus / recipe
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        (work / "parts.json").unlink(missing_ok=True)
    out, config, log = work / "run", work / "config.yaml", work / "log.txt"
    settings = run_config(args, corpus_dir, out, steps)
    settings["eval_at_start"] = bool(overrides.get("merge_base"))  # merge_base's guard needs the base's numbers
    if not overrides.get("merge_base"):
        settings["merge_base"] = False  # merging is the default: a recipe without it says so
    config.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    model = str(args.model) if recipe == "base" else str(out)
    evaluate = [sys.executable, "-m", "whisper_ft.cli.evaluate", "--config", str(config), "--model", model]
    short = ([*evaluate, "--output-dir", str(work / "eval")] if recipe == "base" else
             [sys.executable, "train_loop.py", "--config", str(config), *flags(overrides)]) \
        + ["--max-eval-samples", str(args.eval_clips)]
    longf = [*evaluate, "--long-form", str(corpus_dir), "--split", "heldout", "--max-eval-samples",
             str(args.long_form_clips), "--output-dir", str(work / "long-form")]
    again = ["python", "bench/quality.py", "--model", str(args.model), "--corpus", corpus, "--recipe", recipe,
             "--steps", str(args.steps), "--lr", str(args.lr), "--batch", str(args.batch), "--seed", str(args.seed),
             "--eval-clips", str(args.eval_clips), "--long-form-clips", str(args.long_form_clips),
             *[f"--set={k}={v}" for k, v in args.set.items()]]

    def train_or_evaluate():
        if recipe != "base" and out.exists():
            if not (out / "metrics.jsonl").is_file():
                raise SystemExit(f"quality: {out} exists and was not written by a training run; remove it or use --work")
            shutil.rmtree(out)  # a fresh run, not a resume of an older one
        shutil.rmtree(work / "eval", ignore_errors=True)
        start = time.perf_counter()
        run(short, log)
        if recipe == "base":
            row, tuned = {name: json.loads((work / "eval" / name / "summary.json").read_text())["metrics"]["eval_wer"]
                          for name in SETS}, None
        else:
            row, tuned = after_training(out)
        return {"row": row, "tuned": tuned, "minutes": round((time.perf_counter() - start) / 60, 1)}

    def long_form_check():
        shutil.rmtree(work / "long-form", ignore_errors=True)
        start = time.perf_counter()
        run(longf, log)
        return {**long_form(json.loads((work / "long-form" / "long_form.json").read_text())),
                "minutes": round((time.perf_counter() - start) / 60, 1)}

    print(f"quality: {corpus}/{recipe}: {shlex.join(short)}", flush=True)
    first = cached(work, short, config, train_or_evaluate)
    rows = [{**first["row"], "minutes": first["minutes"]}]
    if args.long_form_clips > 0:
        second = cached(work, longf, config, long_form_check)
        rows[0].update({k: v for k, v in second.items() if k != "minutes"}, minutes=first["minutes"] + second["minutes"])
    rows[0].update(recipe=recipe, commands=[shlex.join(short)] + ([shlex.join(longf)] if args.long_form_clips else []))
    if first["tuned"] is not None:  # the same run before merging: what the recipe gives without merge_base
        rows.append({**first["tuned"], "recipe": recipe + " before merging (alpha 1)", "commands": [shlex.join(short)]})
    for row in rows:
        row.update(corpus=corpus, overrides=overrides, steps=steps if recipe != "base" else 0, command=shlex.join(again))
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table: every row against the base row of its corpus, with its command."""
    cell = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| corpus | recipe | domain | unseen | general | long-form | long-form: outside / glued / repeats "
             "| minutes | command |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        alpha = f" (alpha {r['alpha']})" if r.get("alpha") is not None else ""
        lines.append(f"| {r['corpus']} | {r['recipe']}{alpha} | " + " | ".join(cell(r.get(k)) for k in (*SETS, "long"))
                     + f" | {cell(r.get('long_outside'))} / {cell(r.get('long_glued'))} / {cell(r.get('long_repeats'))}"
                     + f" | {cell(r.get('minutes'))} | `{r['command']}` |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """The issue's target per trained row: domain <= base/10, unseen < base/3, general <= base."""
    base = {r["corpus"]: r for r in rows if r["recipe"] == "base"}
    out = []
    for r in rows:
        b = base.get(r["corpus"])
        if r["recipe"] == "base" or b is None:
            continue
        checks = [("domain <= base/10", r["domain"] <= b["domain"] / 10),
                  ("unseen < base/3", r["unseen"] < b["unseen"] / 3),
                  ("general <= base", r["general"] <= b["general"])]
        met = all(ok for _, ok in checks)
        out.append(f"{r['corpus']}/{r['recipe']}: " + ("meets the target" if met else "misses: " + ", ".join(
            name for name, ok in checks if not ok)))
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL), help="a real Whisper folder (or Hub id)")
    p.add_argument("--corpus", nargs="+", default=list(quality_corpus.CORPORA), choices=list(quality_corpus.CORPORA))
    p.add_argument("--recipe", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each trained recipe (default 60)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate unless the recipe sets one (default 1e-4)")
    p.add_argument("--batch", type=int, default=8, help="training batch size (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seeds the corpus's sentences and the training run")
    p.add_argument("--eval-clips", type=int, default=40, help="clips per evaluation set, at most 40 (default 40)")
    p.add_argument("--long-form-clips", type=int, default=40,
                   help="held-out clips joined into the long-form recording (40: about 3 min); 0 = no long-form")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override added to every trained recipe (repeatable)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "whisper-ft" / "quality",
                   help="where the corpora are spoken to (outside the repository)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "whisper-ft" / "quality-runs",
                   help="where the runs and their results go")
    p.add_argument("--fresh", action="store_true", help="redo rows whose results are kept")
    p.add_argument("--json", type=Path, help="also write every row to this file")
    args = p.parse_args(argv)
    pairs = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--set needs KEY=VALUE, not {item!r}")
        pairs[key.strip().replace("-", "_")] = yaml_value(value)
    args.set = pairs
    if not 1 <= args.eval_clips <= 40 or not 0 <= args.long_form_clips <= 40:
        p.error("--eval-clips must be 1..40 and --long-form-clips 0..40 (each set has 40 clips)")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    args.cache, args.work = args.cache.expanduser(), args.work.expanduser()
    return args


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text) if text.strip() else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file() and not str(args.model).count("/") == 1:
        print(f"quality: no model at {args.model}; build whisper-tiny.en with "
              "bash ../shared/real-whisper/get-tiny-en.sh DIR, or pass --model", file=sys.stderr)
        return 2
    rows = []
    for corpus in args.corpus:
        corpus_dir = quality_corpus.build(corpus, args.cache, args.seed)
        for recipe in args.recipe:
            for row in measure(args, corpus, corpus_dir, recipe):
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print(f"\nquality table ({args.model}; {args.steps} steps, batch {args.batch}, lr {args.lr} "
          f"unless the recipe says; {args.eval_clips} clips per set; WER %, normalised):\n")
    print(table(rows))
    for line in verdict(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
