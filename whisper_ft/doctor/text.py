"""The corpus's writing, judged as a whole: a transcript is odd only against the others.

Each check returns per-sample findings {sample key: [(reason, detail)]} and a summary for the report.
A sample key is (split, id). Findings compare samples with each other, so they are computed after the
survey has seen every sample.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict

from whisper_ft.evaluation import normalize

DIGITS = re.compile(r"\d")
# Number words are known for English only; other languages are checked for digits alone (docs/inspect.md).
NUMBER_WORDS = {"en": set("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                          "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
                          "eighty ninety hundred thousand million billion".split())}
MANY_PIECES = 3  # a word the tokenizer splits into this many pieces or more is the domain's own vocabulary
WORDS_TOKENIZED = 3000  # the most frequent distinct words are tokenized; the rest hardly matter for training


def script(char: str) -> str | None:
    """A letter's script as Unicode names it (LATIN, CYRILLIC, BENGALI, CJK, ...); None for anything else."""
    if not unicodedata.category(char).startswith("L"):
        return None
    name = unicodedata.name(char, "")
    return name.split()[0] if name else None


def script_findings(samples: list[dict]) -> tuple[dict, dict]:
    """Letters outside the corpus's usual script (its commonest one, plus any covering 5% of its letters)."""
    counts = Counter(s for x in samples for s in map(script, x["text"]) if s)
    total = sum(counts.values())
    usual = {s for s, n in counts.items() if n >= 0.05 * total} | ({counts.most_common(1)[0][0]} if counts else set())
    found = {}
    for x in samples:
        odd = sorted({c for c in x["text"] if script(c) and script(c) not in usual})
        if odd:
            found[x["key"]] = [("foreign script", "letters " + "".join(odd[:10]) + f" outside {'/'.join(sorted(usual))}")]
    return found, {"scripts": dict(counts.most_common()), "usual": sorted(usual)}


def number_findings(samples: list[dict], lang_code: str) -> tuple[dict, dict]:
    """Numbers written as digits in some transcripts and as words in others: the model learns both at random.

    The style used by fewer transcripts is flagged (both when they are as many)."""
    words = NUMBER_WORDS.get(lang_code, set())
    digits = [x for x in samples if DIGITS.search(x["text"])]
    spelled = [x for x in samples if words & set(normalize(x["text"]).split())]
    summary = {"with_digits": len(digits), "with_number_words": len(spelled),
               "number_words_known": bool(words)}
    found: dict = {}
    if digits and spelled:
        flagged = [(digits, "digits")] if len(digits) < len(spelled) else [(spelled, "number words")] \
            if len(spelled) < len(digits) else [(digits, "digits"), (spelled, "number words")]
        for group, style in flagged:
            for x in group:
                found.setdefault(x["key"], []).append(
                    ("digits/words mix", f"numbers as {style} here; {len(digits)} transcripts use digits, "
                                         f"{len(spelled)} number words"))
    return found, summary


def habits(samples: list[dict]) -> dict:
    """Casing and punctuation habits: counts of transcripts of each kind (reported, not flagged)."""
    case, end = Counter(), Counter()
    for x in samples:
        letters = [c for c in x["text"] if c.isalpha()]
        cased = [c for c in letters if c.lower() != c.upper()]
        if not cased:
            case["no case"] += 1
        elif all(c.islower() for c in cased):
            case["all lowercase"] += 1
        elif all(c.isupper() for c in cased) and len(cased) > 1:
            case["all uppercase"] += 1
        elif next(c for c in letters if c.lower() != c.upper()).isupper():
            case["starts uppercase"] += 1
        else:
            case["other"] += 1
        last = x["text"].rstrip()[-1:] or " "
        end["ends with punctuation" if unicodedata.category(last).startswith("P") else "no final punctuation"] += 1
    inner = sum(1 for x in samples if any(unicodedata.category(c).startswith("P") for c in x["text"].rstrip()[:-1]))
    return {"casing": dict(case), "ending": dict(end), "punctuation_inside": inner}


def split_words(samples: list[dict], tokenizer, top: int = 20) -> list[dict]:
    """The most frequent words the tokenizer cuts into MANY_PIECES or more: the domain's vocabulary, which
    fine-tuning has to teach (names, jargon, another language's words)."""
    freq = Counter(w for x in samples for w in x["text"].split() if any(c.isalnum() for c in w))
    out = []
    for word, n in freq.most_common(WORDS_TOKENIZED):
        word = word.strip(".,;:!?\"'()[]")
        if not word:
            continue
        pieces = len(tokenizer(" " + word, add_special_tokens=False).input_ids)
        if pieces >= MANY_PIECES:
            out.append({"word": word, "count": n, "pieces": pieces})
    merged: dict[str, dict] = {}
    for w in out:  # "word," and "word" are one word
        merged.setdefault(w["word"], {**w, "count": 0})["count"] += w["count"]
    return sorted(merged.values(), key=lambda w: (-w["count"], -w["pieces"]))[:top]


NEAR_SECONDS, NEAR_DB = 0.03, 1.0  # a near duplicate: the same words, as long and as loud (a re-encoded copy)


def duplicate_findings(samples: list[dict]) -> dict:
    """Within a split: the same audio with the same transcript (a duplicate), or with another transcript; and
    near duplicates: other audio with the same words (normalised) of the same length and level, within
    NEAR_SECONDS and NEAR_DB (a copy re-encoded or resampled; two speakers never match that closely)."""
    found: dict = {}
    first: dict = {}
    said: dict = defaultdict(list)
    for x in samples:
        if not x.get("audio_hash"):
            continue
        key = (x["split"], x["audio_hash"])
        if key not in first:
            first[key] = x
            twin = next((y for y in said[(x["split"], normalize(x["text"]))] if x.get("seconds") and y.get("seconds")
                         and abs(x["seconds"] - y["seconds"]) <= NEAR_SECONDS and "rms_dbfs" in x and "rms_dbfs" in y
                         and abs(x["rms_dbfs"] - y["rms_dbfs"]) <= NEAR_DB), None)
            if twin is not None:
                found.setdefault(x["key"], []).append(("near duplicate", f"same words, length and level as {twin['id']}"))
            said[(x["split"], normalize(x["text"]))].append(x)
            continue
        earlier = first[key]
        if " ".join(earlier["text"].split()) == " ".join(x["text"].split()):
            found.setdefault(x["key"], []).append(("duplicate", f"same audio and transcript as {earlier['id']}"))
        else:
            found.setdefault(x["key"], []).append(("same audio, different transcript",
                                                   f"{earlier['id']} has this audio with {earlier['text']!r}"))
    return found


def overlap_findings(train: list[dict], evals: list[dict]) -> tuple[dict, dict]:
    """Evaluation samples that are training samples too, by audio content or by transcript: their WER flatters
    the model. Text overlap is normal for read speech with a shared sentence list (one sentence, many speakers)."""
    by_audio = {x["audio_hash"]: x["id"] for x in train if x.get("audio_hash")}
    by_text = {normalize(x["text"]): x["id"] for x in train if normalize(x["text"])}
    found, summary = {}, defaultdict(lambda: {"audio": 0, "text": 0, "samples": 0})
    for x in evals:
        summary[x["split"]]["samples"] += 1
        if x.get("audio_hash") in by_audio:
            found[x["key"]] = [("train/eval overlap (audio)", f"the audio of training sample {by_audio[x['audio_hash']]}")]
            summary[x["split"]]["audio"] += 1
        elif normalize(x["text"]) in by_text:
            found[x["key"]] = [("train/eval overlap (text)", f"the transcript of training sample {by_text[normalize(x['text'])]}")]
            summary[x["split"]]["text"] += 1
    return found, dict(summary)


def rate_findings(samples: list[dict]) -> tuple[dict, dict]:
    """Speaking rate (characters per second) far outside the corpus's: a transcript too long or short for its
    audio (cut audio, a transcript of another clip, a missing sentence). Outliers lie 3 IQR beyond the quartiles."""
    import numpy as np

    rated = [x for x in samples if x.get("chars_per_second") is not None]
    if len(rated) < 8:
        return {}, {"low": None, "high": None}
    rates = np.array([x["chars_per_second"] for x in rated])
    q1, q3 = np.percentile(rates, [25, 75])
    low, high = max(0.0, q1 - 3 * (q3 - q1)), q3 + 3 * (q3 - q1)
    found = {x["key"]: [("speaking rate outlier", f"{x['chars_per_second']:.1f} characters/s; usual "
                                                  f"{low:.1f}-{high:.1f}")]
             for x in rated if not low <= x["chars_per_second"] <= high}
    return found, {"low": round(float(low), 2), "high": round(float(high), 2)}
