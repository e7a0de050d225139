"""report.json (for scripts), report.md (for people, plots embedded) and the console summary."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from whisper_ft.doctor.ranking import worst_first

MD_SAMPLES = 50  # suspicious samples listed in report.md (report.json lists them all)


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    values = sorted(values)
    return {"min": round(values[0], 2), "median": round(statistics.median(values), 2),
            "p95": round(values[min(len(values) - 1, int(0.95 * len(values)))], 2), "max": round(values[-1], 2)}


DURATION_BINS = (0, 1, 2, 5, 10, 20, 30)


def _histogram(seconds: list[float]) -> dict:
    """'0-1 s': n, ..., '20-30 s': n (usable samples are 30 s at most)."""
    edges = list(DURATION_BINS) + [float("inf")]
    return {f"{a}-{b} s" if b != float("inf") else f"over {a} s": sum(a <= v < b for v in seconds)
            for a, b in zip(edges, edges[1:]) if b != float("inf") or any(v >= a for v in seconds)}


def split_summary(samples: list[dict]) -> dict:
    """Counts and shape of one split."""
    usable = [x for x in samples if not x["skipped"]]
    skipped = Counter(x["skipped"] for x in samples if x["skipped"])
    return {
        "samples": len(samples), "usable": len(usable), "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped.most_common()),
        "skipped_share": round(sum(skipped.values()) / len(samples), 4) if samples else None,
        "hours": round(sum(x["seconds"] for x in usable) / 3600, 4),
        "seconds": _stats([x["seconds"] for x in usable]),
        "duration_histogram": _histogram([x["seconds"] for x in usable]),
        "sample_rates": dict(Counter(str(x["sample_rate"]) for x in usable if x.get("sample_rate")).most_common()),
        "channels": dict(Counter(str(x["channels"]) for x in usable if x.get("channels")).most_common()),
        "characters": _stats([x["chars"] for x in usable]),
        "tokens": _stats([x["tokens"] for x in usable]),
        "chars_per_second": _stats([x["chars_per_second"] for x in usable if x.get("chars_per_second")]),
        "over_30_s": skipped.get("audio over 30 s", 0),
        "over_448_tokens": skipped.get("transcript over 448 tokens", 0),
        "empty_transcripts": skipped.get("empty transcript", 0),
    }


def findings(samples: list[dict]) -> dict:
    """reason -> {count, samples: ["split/id", ...]}, commonest first."""
    out: dict = {}
    for x in samples:
        for reason, _ in dict.fromkeys(x["reasons"]):
            out.setdefault(reason, []).append(f"{x['split']}/{x['id']}")
    return {r: {"count": len(ids), "samples": ids} for r, ids in sorted(out.items(), key=lambda kv: -len(kv[1]))}


def sample_entry(x: dict) -> dict:
    return {"id": x["id"], "split": x["split"], "audio": x["audio"], "transcript": x["text"],
            "model_output": x.get("model_output"),
            "reasons": [{"reason": r, "detail": d} for r, d in worst_first(x["reasons"])],
            "scores": x.get("scores"), "seconds": x.get("seconds")}


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")


def _cell(text) -> str:
    return str("" if text is None else text).replace("|", "\\|").replace("\n", " ")


def markdown(r: dict) -> str:
    v = r["verdict"]
    lines = [f"# Data report: {r['data']['dataset_name']}", "",
             f"**{'Usable' if v['usable'] else 'Training would refuse this data'}** (exit code {v['exit_code']})"
             + ("" if not v["reasons"] else ": " + "; ".join(v["reasons"])), ""]
    lines += ["## Splits", "", "| split | samples | usable | skipped | hours | seconds (min / median / max) | "
              "sample rates | chars/s (median) | tokens (max) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["splits"].items():
        sec = s["seconds"] or {}
        lines.append(f"| {name} | {s['samples']} | {s['usable']} | {s['skipped']} | {s['hours']:.3f} | "
                     f"{sec.get('min', '')} / {sec.get('median', '')} / {sec.get('max', '')} | "
                     f"{', '.join(f'{k} Hz: {n}' for k, n in s['sample_rates'].items())} | "
                     f"{(s['chars_per_second'] or {}).get('median', '')} | {(s['tokens'] or {}).get('max', '')} |")
    skipped = {k: n for s in r["splits"].values() for k, n in s["skipped_by_reason"].items()}
    if skipped:
        lines += ["", "Skipped by training (the loop's own reasons): "
                  + ", ".join(f"{n} {k}" for k, n in skipped.items()) + "."]
    if not r["plots"]:
        lines += ["", "(No plots: matplotlib is not installed; `pip install matplotlib` draws them.)"]
    lines += [f"\n![{name[:-4]}]({name})\n" for name in r["plots"] if name != "scores.png"]
    if r.get("model"):
        m = r["model"]
        lines += ["## The model", "", f"`{m['name']}`: {m['samples']} samples in {m['seconds']:.0f} s "
                  f"({m['seconds_per_100_samples']:.1f} s per 100 samples on {m['device']}).", "",
                  "| split | WER | CER | samples |", "|---|---|---|---|"]
        lines += [f"| {s} | {w.get('wer', '')} | {w.get('cer', '')} | {w.get('samples', '')} |"
                  for s, w in m["wer_per_split"].items()]
        lines += ["", "![scores](scores.png)", ""] if "scores.png" in r["plots"] else [""]
    lines += ["## Findings", "", "| reason | samples | first |", "|---|---|---|"]
    lines += [f"| {_cell(k)} | {f['count']} | {_cell(', '.join(f['samples'][:3]))} |" for k, f in r["findings"].items()]
    if not r["findings"]:
        lines.append("| none | 0 | |")
    lines += ["", f"## Suspicious samples ({len(r['suspicious_samples'])}, most suspicious first)", "",
              "| # | split | id | transcript | model output | reasons |", "|---|---|---|---|---|---|"]
    for i, x in enumerate(r["suspicious_samples"][:MD_SAMPLES], 1):
        reasons = "; ".join(f"{e['reason']} ({e['detail']})" if e["detail"] else e["reason"] for e in x["reasons"])
        lines.append(f"| {i} | {x['split']} | {_cell(x['id'])} | {_cell(x['transcript'])} | "
                     f"{_cell(x['model_output'])} | {_cell(reasons)} |")
    t = r["text"]
    lines += ["", "## Text", "", f"Scripts: {', '.join(f'{k} {n}' for k, n in t['scripts']['scripts'].items())} "
              f"(usual: {', '.join(t['scripts']['usual'])}).",
              f"Numbers: {t['numbers']['with_digits']} transcripts with digits, {t['numbers']['with_number_words']} "
              "with number words" + ("" if t["numbers"]["number_words_known"] else " (number words known for "
                                                                                     "English only)") + ".",
              "Casing: " + ", ".join(f"{k} {n}" for k, n in t["habits"]["casing"].items()) + "; endings: "
              + ", ".join(f"{k} {n}" for k, n in t["habits"]["ending"].items()) + "."]
    if t["split_words"]:
        lines += ["", "Frequent words the tokenizer cuts into many pieces (the vocabulary fine-tuning has to teach): "
                  + ", ".join(f"{w['word']} ({w['count']}x, {w['pieces']} pieces)" for w in t["split_words"]) + "."]
    lines += ["", "## Cost (estimate)", "", r["cost"]["sentence"] + "."]
    if r["loader_messages"]:
        lines += ["", "## What the training loop's checks said", ""] + [f"- {_cell(m)}" for m in r["loader_messages"]]
    return "\n".join(lines) + "\n"


def console(r: dict, out: Path) -> str:
    """A few lines: sizes, what is wrong, where to look, the verdict."""
    lines = []
    for name, s in r["splits"].items():
        lines.append(f"{name}: {s['samples']} samples, {s['hours']:.2f} h, {s['skipped']} skipped by training"
                     + (f" ({', '.join(f'{n} {k}' for k, n in s['skipped_by_reason'].items())})" if s["skipped"] else ""))
    if r.get("model"):
        lines.append(f"{r['model']['name']}: " + ", ".join(
            f"{s} WER {w.get('wer', 'n/a')}" for s, w in r["model"]["wer_per_split"].items()))
    if r["findings"]:
        lines.append("findings: " + ", ".join(f"{f['count']} {k}" for k, f in r["findings"].items()))
    for x in r["suspicious_samples"][:5]:
        lines.append(f"  look at {x['split']}/{x['id']}: {x['reasons'][0]['reason']}")
    lines.append("cost: " + r["cost"]["sentence"])
    v = r["verdict"]
    lines.append(("usable" if v["usable"] else "training would refuse this data: " + "; ".join(v["reasons"]))
                 + f"; report: {out / 'report.md'}")
    return "\n".join(lines)
