"""Does `inspect --with-model` put mislabelled samples first? Planted mislabels on a real Whisper, one line.

    python bench/inspect_mislabels.py [--model /work/real/whisper-tiny.en] [--corpus travel] [--samples 120]
                                      [--planted 5] [--seed 0]

Takes the first --samples training clips of a bench/quality_corpus.py corpus (spoken with espeak-ng the first
time, as bench/quality.py does), rotates the transcripts of --planted of them among themselves (each now
belongs to another clip), runs `python -m whisper_ft.cli.inspect --with-model` on them and prints how many
planted samples are in the first 10 suspicious samples, where each one ranked, and the time per 100 samples.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import quality_corpus  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/work/real/whisper-tiny.en", help="a real Whisper folder (or Hub id)")
    p.add_argument("--corpus", default="travel", choices=list(quality_corpus.CORPORA))
    p.add_argument("--samples", type=int, default=120, help="training clips to inspect (at most 180)")
    p.add_argument("--planted", type=int, default=5, help="transcripts rotated among themselves")
    p.add_argument("--seed", type=int, default=0, help="seeds the corpus and which clips are planted")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "whisper-ft" / "quality")
    args = p.parse_args()

    corpus = quality_corpus.build(args.corpus, args.cache, args.seed)
    with open(corpus / "train.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[: args.samples]
    planted = sorted(random.Random(args.seed).sample(range(len(rows)), args.planted))
    texts = [rows[i]["text"] for i in planted]
    for i, text in zip(planted, texts[1:] + texts[:1]):  # each planted clip gets the next one's transcript
        rows[i]["text"] = text
    work = Path(tempfile.mkdtemp(prefix="inspect-mislabels-"))
    manifest = work / "data.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=["path", "text"])
        out.writeheader()
        out.writerows({"path": str(corpus / r["path"]), "text": r["text"]} for r in rows)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"lang": "en", "whisper_pretrained": str(args.model),
                                      "dataset_name": str(manifest), "train_split": "train",
                                      "eval_strategy": "no", "load_best_model_at_end": False}), encoding="utf-8")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "whisper_ft.cli.inspect", "--config", str(config), "--with-model",
                           "--output-dir", str(work / "report")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-3000:])
        return 1
    report = json.loads((work / "report" / "report.json").read_text())
    ranked = [Path(s["audio"]).name if s.get("audio") else s["id"] for s in report["suspicious_samples"]]
    names = [Path(rows[i]["path"]).name for i in planted]
    ranks = {n: ranked.index(n) + 1 if n in ranked else None for n in names}
    top10 = sum(r is not None and r <= 10 for r in ranks.values())
    print(f"{args.corpus}, {len(rows)} clips, {args.planted} planted mislabels, {args.model}: {top10} of "
          f"{args.planted} in the first 10 suspicious samples (ranks {sorted(r or 0 for r in ranks.values())}; "
          f"{len(ranked)} listed); {seconds / len(rows) * 100:.0f} s per 100 samples, report in {work / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
