"""Every sample of every split once, through the training loop's own readers and checks.

The splits come from batches.load_data and batches.load_eval_sets, as train_loop.setup calls them, so the
doctor sees the records training would see (the same sources, columns, caps and mixtures) and hears the same
warnings. When load_data refuses the data, that refusal is the verdict; the training split is then read with
the same reader (sources.load_records) to show what is in it. Each sample then goes through the loop's
Prepare: a Bad is the reason training would skip it, word for word.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from whisper_ft.data import DataError, Prepare, clean_text, decode_audio
from whisper_ft.doctor.audio import audio_facts, audio_reasons

STREAMED_SAMPLES = 1000  # a streamed training split is inspected this far without --max-samples
SKIPPED = "skipped: "  # the prefix of the loop's own skip reasons


@dataclass
class Loaded:
    splits: dict[str, list] = field(default_factory=dict)  # "train" and each evaluation set -> records
    refused: list[str] = field(default_factory=list)  # why training would not start (load_data's DataError)
    messages: list[str] = field(default_factory=list)  # what the loop's checks said while loading


def load(cfg, lang, prepare: Prepare, max_samples: int = 0) -> Loaded:
    from whisper_ft import batches

    out = Loaded()
    say = lambda message, *_, **__: out.messages.append(message)  # noqa: E731 - the loop's say(), collected
    try:
        train, evals = batches.load_data(cfg, lang, prepare, say)
        sets = batches.load_eval_sets(cfg, lang, prepare, say, evals, train)
    except DataError as e:
        out.refused.append(str(e))
        train, sets = _train_only(cfg, lang, out), {}
    if not isinstance(train, list):  # a streamed Hub split: its first samples
        train = list(itertools.islice(train, max_samples or STREAMED_SAMPLES))
    out.splits["train"] = train[: max_samples or None]
    for name, records in sets.items():
        out.splits[name if name != "train" else "eval:train"] = records[: max_samples or None]
    return out


def _train_only(cfg, lang, out: Loaded) -> list:
    """The training records as the source gives them, after load_data refused them (to show what is wrong)."""
    from whisper_ft.sources import load_records

    try:
        records = load_records(cfg.dataset_name, cfg.train_split, lang=lang, text_column=cfg.text_column,
                               audio_column=cfg.audio_column, dataset_config=cfg.dataset_config,
                               revision=cfg.dataset_revision, cache_dir=cfg.dataset_cache, token=cfg.hf_token,
                               streaming=cfg.streaming)
    except DataError:  # the source itself cannot be read: the refusal already says why
        return []
    return records if not isinstance(records, list) else records[: cfg.max_train_samples or None]


def survey(split: str, records: list, prepare: Prepare) -> list[dict]:
    """One dict per record: id, audio path, transcript, the loop's skip reason, audio and transcript facts."""
    return [_sample(split, r, prepare) for r in records]


def _sample(split: str, record, prepare: Prepare) -> dict:
    text = clean_text(record.text or "")
    x = {"key": (split, record.id), "split": split, "id": record.id, "audio": record.path, "text": text,
         "reasons": [], "skipped": None}
    x["audio_hash"] = _audio_hash(record)
    prepared = prepare(record)
    if not isinstance(prepared, dict):  # a Bad: training skips this sample, for this reason
        x["skipped"] = prepared.reason
        x["reasons"].append((SKIPPED + prepared.reason, prepared.detail))
        if record.duration is not None:
            x["seconds"] = record.duration
        return x
    x["seconds"] = round(prepared["seconds"], 3)
    x["tokens"] = len(prepared["labels"])
    x["chars"] = len(text)
    x["chars_per_second"] = round(len(text) / prepared["seconds"], 2) if prepared["seconds"] else None
    x.update(_format(record))
    if x.get("sample_rate") and x["sample_rate"] < 16_000:
        x["reasons"].append(("low sample rate", f"{x['sample_rate']} Hz: upsampled to 16 kHz, the top of the "
                                                "speech band is missing"))
    facts = audio_facts(decode_audio(record))
    x.update(facts)
    x["reasons"] += audio_reasons(facts)
    return x


def _format(record) -> dict:
    """Sample rate and channels as stored (the loop resamples and downmixes; a mixture of rates is worth knowing)."""
    import soundfile as sf

    data = record.fetch() if record.fetch is not None else record.audio_bytes
    try:
        info = sf.info(io.BytesIO(data) if data is not None else record.path)
    except Exception:  # noqa: BLE001 - decoded fine by Prepare, so only the header is odd: no facts, no finding
        return {}
    return {"sample_rate": int(info.samplerate), "channels": int(info.channels)}


def _audio_hash(record) -> str | None:
    """A digest of the encoded audio: the same file under two names or in two splits is found by content."""
    data = record.audio_bytes
    if data is None and record.fetch is None and record.path and Path(record.path).is_file():
        try:
            data = Path(record.path).read_bytes()
        except OSError:
            return None
    return hashlib.blake2b(data, digest_size=12).hexdigest() if data is not None else None
