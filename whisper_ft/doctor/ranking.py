"""Which samples to look at first, and why.

Without a model, samples with findings are ordered by how bad their worst finding is (SEVERITY). With a model,
the samples whose transcript the model finds unlikely come first: those are the mislabelled ones (a
transcript of another clip, a sentence missing), which no other check can find. A sample's suspicion is the
geometric mean of its percentile ranks by CER against the model's transcript and by the loss margin: the model's loss
per token on the given transcript minus its loss on its own transcript. The geometric mean asks both to be high: a transcript with a word the model has never
seen ("1" for "one") has a large margin but a small CER, and a clip the model misreads a large CER but a small
margin. The margin, not the loss itself, tells
a mislabelled clip (its own transcript likely, the given one not) from a clip the model reads badly (every
transcript unlikely: an unfamiliar voice or accent). Both are measured from the median of the sample's split:
an evaluation set of another voice or domain has its own baseline (the model may read half of it wrongly), and
a mislabelled sample stands out against its own split, not against the easiest one. A clip with an audio finding (silence, little speech) or one that training skips is not in
that first group: its transcript is unlikely because of its audio, and the audio finding says so.
"""

from __future__ import annotations

import math
import statistics

MISMATCH = "transcript does not match audio"
MISMATCH_CER = 0.5  # the model's transcript differs in half of the characters or more
LOSS_MADS = 5.0  # or the loss margin lies this many (scaled) median absolute deviations above the median
MIN_MARGIN = 1.0  # and at least this far (nats per token): most margins are 0 when the model agrees with most
# Lower = worse; reasons not named here (the loop's skip reasons, "skipped: ...") rank with the first group.
SEVERITY = {
    "near-silent audio": 0, "same audio, different transcript": 0, "train/eval overlap (audio)": 0,
    MISMATCH: 1, "little speech": 1, "duplicate": 1, "near duplicate": 1, "low sample rate": 1, "speaking rate outlier": 1,
    "clipped audio": 2, "foreign script": 2, "digits/words mix": 2, "train/eval overlap (text)": 3,
}
AUDIO_FAULTS = {"near-silent audio", "little speech"}
# Findings that do not make a sample worth a look by themselves: read speech often shares one sentence list
# between splits (one sentence, many speakers), so the same text in train and eval is reported, not listed.
NOT_SUSPICIOUS = {"train/eval overlap (text)"}


def severity(reason: str) -> int:
    return SEVERITY.get(reason, 0)


def percentile_ranks(values: list[float]) -> list[float]:
    """Each value's rank among them, 0 (lowest) .. 1 (highest); ties share their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 / max(1, len(values) - 1)
        i = j + 1
    return ranks


def add_model_findings(samples: list[dict], scores: dict) -> dict:
    """Put each sample's scores and suspicion on it and the mismatch finding where due; returns the thresholds."""
    scored = [x for x in samples if x["key"] in scores and scores[x["key"]]["cer"] is not None]
    if not scored:
        return {}
    for x in scored:
        x["scores"] = {k: scores[x["key"]][k] for k in ("cer", "wer", "loss", "margin")}
        x["model_output"] = scores[x["key"]]["model_output"]
    base = {}
    for split in {x["split"] for x in scored}:
        mine = [x["scores"] for x in scored if x["split"] == split]
        base[split] = (statistics.median(s["cer"] for s in mine), statistics.median(s["margin"] for s in mine))
    cer_rank = percentile_ranks([x["scores"]["cer"] - base[x["split"]][0] for x in scored])
    margin_rank = percentile_ranks([x["scores"]["margin"] - base[x["split"]][1] for x in scored])
    margins = [x["scores"]["margin"] for x in scored]
    median = statistics.median(margins)
    mad = 1.4826 * statistics.median(abs(v - median) for v in margins)
    limit = median + max(LOSS_MADS * mad, MIN_MARGIN)
    for x, c, m in zip(scored, cer_rank, margin_rank):
        x["scores"]["suspicion"] = round(math.sqrt(c * m), 4)  # both must be high: a geometric mean
        cer, loss, margin = x["scores"]["cer"], x["scores"]["loss"], x["scores"]["margin"]
        if cer >= MISMATCH_CER or margin > limit:
            x["reasons"].append((MISMATCH, f"CER {100 * cer:.0f}% against the model's transcript; {loss:.2f} loss "
                                           f"per token, {margin:.2f} above the model's own transcript's "
                                           f"(median {median:.2f})"))
    return {"mismatch_cer": MISMATCH_CER, "margin_median": round(median, 4), "margin_limit": round(limit, 4)}


def worst_first(reasons: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A sample's reasons, the one that put it where it is in the list first."""
    return sorted(reasons, key=lambda r: (r[0] != MISMATCH, severity(r[0])))


def suspicious(samples: list[dict]) -> list[dict]:
    """Samples with findings, most suspicious first (see the module's docstring)."""
    def first_group(x):
        names = {r for r, _ in x["reasons"]}
        return MISMATCH in names and not names & AUDIO_FAULTS and not x["skipped"]

    def key(x):
        suspicion = x.get("scores", {}).get("suspicion", 0.0)
        if first_group(x):
            return (0, -suspicion, 0)
        return (1, min(severity(r) for r, _ in x["reasons"]), -suspicion)

    return sorted([x for x in samples if {r for r, _ in x["reasons"]} - NOT_SUSPICIOUS], key=key)
