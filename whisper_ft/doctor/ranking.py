"""Which samples to look at first, and why.

Without a model, samples with findings are ordered by how bad their worst finding is (SEVERITY). With a model,
the samples whose transcript the model finds unlikely come first: those are the mislabelled ones (a
transcript of another clip, a sentence missing), which no other check can find. A sample's suspicion is the
mean of its percentile ranks by CER against the model's transcript and by the model's per-token loss on the
given transcript. A clip with an audio finding (silence, little speech) or one that training skips is not in
that first group: its transcript is unlikely because of its audio, and the audio finding says so.
"""

from __future__ import annotations

import statistics

MISMATCH = "transcript does not match audio"
MISMATCH_CER = 0.5  # the model's transcript differs in half of the characters or more
LOSS_MADS = 5.0  # or the per-token loss lies this many (scaled) median absolute deviations above the median
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
        x["scores"] = {k: scores[x["key"]][k] for k in ("cer", "wer", "loss")}
        x["model_output"] = scores[x["key"]]["model_output"]
    cer_rank = percentile_ranks([x["scores"]["cer"] for x in scored])
    loss_rank = percentile_ranks([x["scores"]["loss"] for x in scored])
    losses = [x["scores"]["loss"] for x in scored]
    median = statistics.median(losses)
    mad = 1.4826 * statistics.median(abs(v - median) for v in losses)
    loss_limit = median + LOSS_MADS * max(mad, 0.05 * median, 1e-6)
    for x, c, lo in zip(scored, cer_rank, loss_rank):
        x["scores"]["suspicion"] = round((c + lo) / 2, 4)
        cer, loss = x["scores"]["cer"], x["scores"]["loss"]
        if cer >= MISMATCH_CER or loss > loss_limit:
            x["reasons"].append((MISMATCH, f"CER {100 * cer:.0f}% against the model's transcript; "
                                           f"{loss:.2f} loss per token (median {median:.2f})"))
    return {"mismatch_cer": MISMATCH_CER, "loss_median": round(median, 4), "loss_limit": round(loss_limit, 4)}


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
