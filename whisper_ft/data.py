"""Where training audio comes from, and how one record becomes model inputs.

Sources -> a list of Records (audio path or bytes + transcript); no audio is decoded here.
  * a local Common Voice release folder (train.tsv, dev.tsv, test.tsv, clips/);
  * a CSV / TSV / JSONL manifest of audio path + text (paths relative to the manifest);
  * a Hugging Face Hub dataset (downloaded, or streamed with streaming: true).
Prepare turns one Record into log-mel features and label ids, or a Bad(reason) that the loop
counts: a broken sample is skipped and reported, never silently swapped for another.
Audio is decoded with soundfile and resampled with soxr, so no FFmpeg is needed (pitfall 14).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 30.0  # Whisper's window; longer audio would be cut while its transcript stays whole
MIN_AUDIO_SECONDS = 0.1  # shorter than this is a truncated or empty file, not speech
TEXT_COLUMNS = ("sentence", "text", "transcription", "raw_transcription", "normalized_text", "transcript")
AUDIO_COLUMNS = ("audio", "path", "file", "file_name", "filename", "audio_filepath")
SPLIT_SYNONYMS = {"validation": "dev", "dev": "dev", "valid": "dev"}


class DataError(Exception):
    """A data source that cannot be used at all (as opposed to a single bad sample)."""


@dataclass
class Record:
    id: str  # unique and stable: names the sample in logs and deduplicates evaluation
    text: str
    path: str | None = None  # audio file on disk ...
    audio_bytes: bytes | None = None  # ... or its encoded bytes (Hub datasets)
    duration: float | None = None  # seconds, when the source knows it without decoding


@dataclass
class Bad:
    id: str
    reason: str  # short, stable, countable: "missing file", "undecodable audio", ...
    detail: str = ""


@dataclass
class BadCounter:
    """Skipped samples by reason, with the first few named, across the whole run."""

    seen: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, bad: Bad) -> None:
        self.counts[bad.reason] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{bad.id}: {bad.reason}{' (' + bad.detail + ')' if bad.detail else ''}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "counts": dict(self.counts), "examples": self.examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.counts, self.examples = state["seen"], Counter(state["counts"]), list(state["examples"])


# ---------------------------------------------------------------------------------------------
# Sources


def load_records(dataset_name: str, split: str, *, lang=None, text_column: str = "", audio_column: str = "",
                 dataset_config: str = "", revision: str = "", cache_dir: str = "", token: str = "",
                 streaming: bool = False):
    """Records of `split` ("train+dev" joins splits): a list, or an iterable for streamed Hub datasets."""
    path = Path(dataset_name).expanduser()
    if path.is_dir() and (path / "clips").is_dir():
        return [r for s in split.split("+") for r in _common_voice(path, s.strip())]
    if path.is_dir() and lang is not None and (path / lang.cv_locale / "clips").is_dir():
        return [r for s in split.split("+") for r in _common_voice(path / lang.cv_locale, s.strip())]
    if path.is_file() or path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        return _manifest(path, split, text_column, audio_column)
    if path.is_dir() and any(path.glob("**/*.parquet")):  # a local copy of a Hub dataset
        from whisper_ft.hub_data import hub_records
        return hub_records(str(path), split, lang=lang, text_column=text_column, audio_column=audio_column,
                           config=dataset_config, revision="", cache_dir=cache_dir, token="", streaming=streaming)
    if path.exists():
        raise DataError(f"{dataset_name} is a folder but not a Common Voice release (no clips/ folder in it"
                        f"{' or in ' + lang.cv_locale + '/' if lang else ''})")
    from whisper_ft.hub_data import hub_records  # imports datasets only when needed
    return hub_records(dataset_name, split, lang=lang, text_column=text_column, audio_column=audio_column,
                       config=dataset_config, revision=revision, cache_dir=cache_dir, token=token, streaming=streaming)


def _common_voice(folder: Path, split: str) -> list[Record]:
    name = SPLIT_SYNONYMS.get(split, split)
    tsv = folder / f"{name}.tsv"
    if not tsv.is_file():
        have = sorted(p.stem for p in folder.glob("*.tsv") if p.stem not in ("clip_durations", "reported"))
        raise DataError(f"split {split!r} not found in {folder}: no {tsv.name}; splits there: {', '.join(have)}")
    durations = {}
    if (folder / "clip_durations.tsv").is_file():  # lets us drop >30 s clips without decoding them
        for row in _read_table(folder / "clip_durations.tsv", "\t"):
            durations[row["clip"]] = float(row["duration[ms]"]) / 1000
    records = []
    for row in _read_table(tsv, "\t"):
        clip = row.get("path") or ""
        records.append(Record(id=clip or f"{tsv.name}:{len(records) + 2}", text=row.get("sentence") or "",
                              path=str(folder / "clips" / clip) if clip else None, duration=durations.get(clip)))
    return records


def _read_table(path: Path, delimiter: str) -> list[dict[str, str]]:
    # Common Voice sentences contain unbalanced quotes: read with quoting off (DESIGN §3, issue 3).
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter, quoting=quoting))


def _manifest(path: Path, split: str, text_column: str, audio_column: str) -> list[Record]:
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = _read_table(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    text_col = _pick_column(rows[0], text_column, TEXT_COLUMNS, "text", path)
    audio_col = _pick_column(rows[0], audio_column, AUDIO_COLUMNS, "audio", path)
    if "split" in rows[0]:
        wanted = {SPLIT_SYNONYMS.get(s.strip(), s.strip()) for s in split.split("+")}
        rows = [r for r in rows if SPLIT_SYNONYMS.get(r["split"], r["split"]) in wanted]
        if not rows:
            raise DataError(f"manifest {path} has no rows with split {split!r}")
    return [Record(id=str(r[audio_col]), text=str(r.get(text_col) or ""), path=str(path.parent / str(r[audio_col])),
                   duration=float(r["duration"]) if r.get("duration") not in (None, "") else None) for r in rows]


def _pick_column(row: dict, chosen: str, candidates: tuple[str, ...], what: str, where: Any) -> str:
    if chosen:
        if chosen not in row:
            raise DataError(f"{what} column {chosen!r} not in {where}; columns: {', '.join(row)}")
        return chosen
    for c in candidates:
        if c in row:
            return c
    raise DataError(f"no {what} column in {where} (looked for {', '.join(candidates)}); "
                    f"set {what}_column to one of: {', '.join(row)}")


# ---------------------------------------------------------------------------------------------
# One record -> model inputs


def decode_audio(record: Record) -> np.ndarray:
    """float32 mono 16 kHz samples; raises ValueError with a short reason."""
    if record.audio_bytes is None and (record.path is None or not Path(record.path).is_file()):
        raise FileNotFoundError(record.path)
    source = io.BytesIO(record.audio_bytes) if record.audio_bytes is not None else record.path
    audio, rate = sf.read(source, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE and len(audio):
        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    return audio


class Prepare:
    """Record -> {"input_features", "labels", "id"} or Bad. Picklable, so it runs in DataLoader workers."""

    def __init__(self, feature_extractor, tokenizer, max_label_tokens: int = 448):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.max_label_tokens = max_label_tokens

    def labels(self, text: str) -> list[int] | Bad:
        if not text.strip():
            return Bad("", "empty transcript")
        ids = self.tokenizer(text).input_ids  # prefix tokens (sot, language, task, notimestamps) + text + eot
        if len(ids) > self.max_label_tokens:
            return Bad("", "transcript over 448 tokens", f"{len(ids)} tokens")
        return ids

    def __call__(self, record: Record) -> dict[str, Any] | Bad:
        labels = self.labels(record.text)
        if isinstance(labels, Bad):
            return Bad(record.id, labels.reason, labels.detail)
        if record.duration is not None and record.duration > MAX_AUDIO_SECONDS:
            return Bad(record.id, "audio over 30 s", f"{record.duration:.1f} s")
        try:
            audio = decode_audio(record)
        except FileNotFoundError:
            return Bad(record.id, "missing file")
        except Exception as e:  # soundfile raises several types for broken files; name the file, keep going
            return Bad(record.id, "undecodable audio", str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
        seconds = len(audio) / SAMPLE_RATE
        if seconds < MIN_AUDIO_SECONDS:
            return Bad(record.id, "empty or truncated audio", f"{seconds:.2f} s")
        if seconds > MAX_AUDIO_SECONDS:
            return Bad(record.id, "audio over 30 s", f"{seconds:.1f} s")
        if not np.isfinite(audio).all():
            return Bad(record.id, "NaN or inf in audio")
        features = self.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        return {"id": record.id, "input_features": features, "labels": labels, "seconds": seconds}


class RecordDataset(torch.utils.data.Dataset):
    """Map-style: index -> prepared sample. Indexing (not iteration) keeps resume exact and cheap."""

    def __init__(self, records, prepare: Prepare):
        self.records, self.prepare = records, prepare

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return self.prepare(self.records[i])


class StreamDataset(torch.utils.data.IterableDataset):
    """Streamed Hub records -> prepared samples; position saved via the stream's own state_dict."""

    def __init__(self, stream, prepare: Prepare):
        self.stream, self.prepare = stream, prepare

    def __iter__(self) -> Iterator:
        for record in self.stream:
            yield self.prepare(record)


# ---------------------------------------------------------------------------------------------
# Order


class TrainBatches(torch.utils.data.Sampler):
    """Endless batches of indices for one process: epoch e is a permutation seeded by (seed, e).

    Every process gets the same number of batches per epoch (the tail that cannot be split evenly
    is left to the next epoch's shuffle), so processes never wait on each other at an epoch end.
    Starting at `start` batches in is a position, not a replay: resume reads no skipped audio.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        per_rank = n // world
        if per_rank == 0:
            raise DataError(f"{n} training samples cannot be shared by {world} processes")
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.per_epoch = math.ceil(per_rank / batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        mine = order[: (self.n // self.world) * self.world][self.rank :: self.world]
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            epoch, offset = divmod(position, self.per_epoch)
            for batch in self.epoch_batches(epoch)[offset:]:
                yield batch
                position += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for warnings
        return 2**62
