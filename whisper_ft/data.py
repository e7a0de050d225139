"""How one record becomes model inputs; where records come from is whisper_ft/sources.py.

Prepare turns one Record into log-mel features and label ids, or a Bad(reason) that the loop
counts: a broken sample is skipped and reported, never silently swapped for another.
Audio is decoded with soundfile and resampled with soxr, so no FFmpeg is needed (DESIGN: FFmpeg).
"""

from __future__ import annotations

import hashlib
import io
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
TIMESTAMP_SECONDS, TIMESTAMP_STEPS = 0.02, 1500  # Whisper's timestamp tokens: <|0.00|> ... <|30.00|>
BAD_LINE = "undecodable table line"  # the reason counted for a manifest/TSV line that cannot be read


class DataError(Exception):
    """A data source that cannot be used at all (as opposed to a single bad sample)."""


@dataclass
class Record:
    id: str  # unique and stable: names the sample in logs and deduplicates evaluation
    text: str
    path: str | None = None  # audio file on disk ...
    audio_bytes: bytes | None = None  # ... or its encoded bytes (Hub datasets)
    duration: float | None = None  # seconds, when the source knows it without decoding
    problem: str = ""  # why its table line could not be read; Prepare turns it into Bad(BAD_LINE)
    fetch: Any = None  # callable returning the encoded audio on demand (rows of a downloaded Hub dataset)


@dataclass
class Bad:
    id: str
    reason: str  # short, stable, countable: "missing file", "undecodable audio", ...
    detail: str = ""

    def named(self) -> str:
        """'id: reason (detail)', as the log names one skipped sample."""
        return f"{self.id}: {self.reason}{' (' + self.detail + ')' if self.detail else ''}"


# Every summary of unusable samples in the logs and errors is built by these two, so they read the same.
def reasons(bads: list[Bad]) -> str:
    """'2 missing file, 1 empty transcript': how many of each reason, commonest first."""
    return ", ".join(f"{n} {reason}" for reason, n in Counter(b.reason for b in bads).most_common())


def name_first(bads: list[Bad], first: int = 3, detail: bool = False) -> str:
    """'a.mp3 (missing file); b.mp3 (undecodable audio, why)': the first few, by id and reason."""
    return "; ".join(f"{b.id} ({b.reason}{', ' + b.detail if detail and b.detail else ''})" for b in bads[:first])


def describe(bads: list[Bad], first: int = 3, detail: bool = False) -> str:
    """'2 missing file, 1 empty transcript; first: a.mp3 (missing file); ...'"""
    return f"{reasons(bads)}; first: {name_first(bads, first, detail)}"


@dataclass
class BadCounter:
    """Skipped samples by reason, with the first few named, across the whole run."""

    seen: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, bad: Bad) -> None:
        self.counts[bad.reason] += 1
        if len(self.examples) < 10:
            self.examples.append(bad.named())

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def first(self, n: int = 5) -> str:
        return "; ".join(self.examples[:n])

    def describe(self, first: int = 5) -> str:
        """'2 missing file, 1 empty transcript; first: a.mp3: missing file; ...' over the whole run."""
        return ", ".join(f"{n} {r}" for r, n in self.counts.most_common()) + "; first: " + self.first(first)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "counts": dict(self.counts), "examples": self.examples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.counts, self.examples = state["seen"], Counter(state["counts"]), list(state["examples"])


# ---------------------------------------------------------------------------------------------
# One record -> model inputs


def decode_audio(record: Record) -> np.ndarray:
    """float32 mono 16 kHz samples; raises FileNotFoundError, or another error for a broken file."""
    data = record.fetch() if record.fetch is not None else record.audio_bytes
    if data is None and record.path is not None and Path(record.path).is_dir():
        raise IsADirectoryError(record.path)
    if data is None and (record.path is None or not Path(record.path).is_file()):
        raise FileNotFoundError(record.path)
    source = io.BytesIO(data) if data is not None else record.path
    audio, rate = sf.read(source, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if rate != SAMPLE_RATE and len(audio):
        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    return np.ascontiguousarray(audio, dtype=np.float32)


def undecodable_detail(record: Record, error: Exception) -> str:
    """Why a file that exists could not be decoded, in words that name the real cause.

    libsndfile says "File does not exist or is not a regular file" for any file it cannot open, even an
    existing one: an empty file, or an MP3 holding only an ID3 tag (a failed download or export, common
    in scraped corpora). Those are told apart by their bytes; for the rest its message is kept.
    """
    try:
        head = record.audio_bytes if record.audio_bytes is not None else Path(record.path).read_bytes() \
            if record.path and Path(record.path).stat().st_size <= 1 << 20 else b""
    except (OSError, TypeError):
        head = b""
    if record.path and Path(record.path).is_file() and Path(record.path).stat().st_size == 0:
        return "empty file (0 bytes)"
    if head[:3] == b"ID3" and len(head) >= 10:
        tag = 10 + int.from_bytes(bytes(b & 0x7F for b in head[6:10]), "big") + (10 if head[5] & 0x10 else 0)
        if not head[tag:].strip(b"\x00"):
            return f"no audio frames: the file holds only an ID3 tag ({len(head)} bytes)"
    why = str(error).splitlines()[0] if str(error) else type(error).__name__
    why = why.split("': ", 1)[-1]
    if why.startswith("File does not exist"):  # libsndfile's wording for "cannot open"; the file does exist
        why = "no audio stream libsndfile can read"
    return "unknown format or corrupt: " + why[:100]


class LogMel:
    """Whisper's log-mel features, equal to its feature extractor's, at a fraction of the cost.

    The extractor pads every clip to 30 s and runs the STFT over all 3000 frames; a 5-s clip leaves
    5/6 of them silent, and a silent frame's value is known without computing it (log10 of the 1e-10
    floor). Here the STFT covers only the frames that touch audio and the rest are filled in; the
    result is the same numbers up to float32 rounding (tested against the extractor). Any extractor that is not a plain
    Whisper one (dither, normalisation, other sizes) is simply called.
    """

    def __init__(self, feature_extractor):
        fe = feature_extractor
        self.fe = fe
        self.fast = (type(fe).__name__ == "WhisperFeatureExtractor" and not getattr(fe, "dither", 0.0)
                     and not getattr(fe, "do_normalize", False) and getattr(fe, "padding_value", 0.0) == 0.0
                     and fe.n_samples == fe.nb_max_frames * fe.hop_length)
        self._tensors = None

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        fe = self.fe
        if not self.fast:
            return fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        n_fft, hop, frames, n_samples = fe.n_fft, fe.hop_length, fe.nb_max_frames, fe.n_samples
        used = min(frames, (len(audio) + n_fft // 2) // hop + 1)  # frames whose window touches audio
        length = (used - 1) * hop + n_fft  # covers those frames' windows; beyond, the extractor sees zeros too
        if length + n_fft // 2 >= n_samples or len(audio) > n_samples:  # near 30 s: its reflect padding matters
            return fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        if self._tensors is None:  # built lazily: in each DataLoader worker, not pickled
            mel = torch.from_numpy(np.ascontiguousarray(fe.mel_filters.T, np.float32))
            self._tensors = (torch.hann_window(n_fft), mel, torch.clamp(torch.zeros(()), min=1e-10).log10())
        window, mel, silent = self._tensors
        padded = np.zeros(max(length, len(audio)), np.float32)
        padded[: len(audio)] = audio
        stft = torch.stft(torch.from_numpy(padded), n_fft, hop, window=window, return_complex=True)[:, :used]
        log_spec = torch.full((mel.shape[0], frames), float(silent))
        log_spec[:, :used] = torch.clamp(mel @ (stft.abs() ** 2), min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).numpy()


class Prepare:
    """Record -> {"input_features", "labels", "id"} or Bad. Picklable, so it runs in DataLoader workers.

    Labels are the transcript as Whisper was trained on it: whitespace-normalised and tokenized with a
    leading space (" The", not "The"), so a fine-tuned model still starts every segment with a space and
    long-form transcripts do not glue sentences together ("...down.Open..."). A share
    (timestamp_probability) of the training draws is timestamped instead of <|notimestamps|>:
    `<|0.00|> text <|T|>`, T the clip's length rounded down to Whisper's 0.02-s grid, so the model keeps
    the timestamp prediction that long-form transcription depends on. Whether a draw is timestamped is a
    pure function of (seed, sample id, draw index), never of a global RNG: resume stays step-exact and
    DataLoader workers agree. Evaluation passes no draw, so it is never timestamped.
    """

    def __init__(self, feature_extractor, tokenizer, max_label_tokens: int = 448, *,
                 timestamp_probability: float = 0.0, seed: int = 0):
        self.feature_extractor = feature_extractor
        self.log_mel = LogMel(feature_extractor)
        self.tokenizer = tokenizer
        self.max_label_tokens = max_label_tokens
        self.timestamp_probability, self.seed = timestamp_probability, seed
        if timestamp_probability > 0:
            self.no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
            if self.no_timestamps in (None, tokenizer.unk_token_id):
                raise DataError("timestamp_probability is above 0 but this tokenizer has no <|notimestamps|> token, "
                                "which Whisper's timestamps are counted from; set timestamp_probability: 0")
            # Whisper's timestamp ids are the 1501 right after <|notimestamps|>, whether or not the tokenizer names
            # them <|0.00|> ... <|30.00|> (many exports do not): generate() counts them the same way
            # (timestamp_begin = no_timestamps_token_id + 1).
            self.timestamp_begin = self.no_timestamps + 1

    def labels(self, text: str) -> list[int] | Bad:
        text = clean_text(text)
        if not text:
            return Bad("", "empty transcript")
        # prefix tokens (sot, language, task, notimestamps) + " " + text + eot: the leading space as in Whisper
        ids = self.tokenizer(" " + text).input_ids
        # A timestamped draw swaps <|notimestamps|> for two timestamps: one token more. Counted for every
        # sample, so whether a sample fits does not depend on the draw.
        count = len(ids) + (1 if self.timestamp_probability > 0 else 0)
        if count > self.max_label_tokens:
            return Bad("", "transcript over 448 tokens", f"{count} tokens")
        return ids

    def timestamped(self, record_id: str, draw: int | None) -> bool:
        """Whether this draw of this sample trains with timestamps: a hash, the same in every process/worker."""
        if draw is None or self.timestamp_probability <= 0:
            return False
        digest = hashlib.blake2b(f"{self.seed}|{record_id}|{draw}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.timestamp_probability

    def with_timestamps(self, ids: list[int], seconds: float) -> list[int]:
        """[sot, lang, task, notimestamps, text.., eot] -> [sot, lang, task, <|0.00|>, text.., <|T|>, eot]."""
        steps = min(TIMESTAMP_STEPS, math.floor(seconds / TIMESTAMP_SECONDS + 1e-6))  # down: T <= the clip's end
        start, end = self.timestamp_begin, self.timestamp_begin + steps
        k = ids.index(self.no_timestamps)
        return ids[:k] + [start] + ids[k + 1 : -1] + [end, ids[-1]]

    def screen(self, record: Record) -> Bad | None:
        """What is wrong with a record before any audio is read: its table line, transcript, or known duration."""
        if record.problem:
            return Bad(record.id, BAD_LINE, record.problem)
        if not record.text.strip():
            return Bad(record.id, "empty transcript")
        # Byte-level BPE: a UTF-8 byte is at most one token, so a short text needs no tokenizing here.
        if len(record.text.encode("utf-8")) + 8 > self.max_label_tokens:
            labels = self.labels(record.text)
            if isinstance(labels, Bad):
                return Bad(record.id, labels.reason, labels.detail)
        if record.duration is not None and record.duration > MAX_AUDIO_SECONDS:
            return Bad(record.id, "audio over 30 s", f"{record.duration:.1f} s")
        return None

    def __call__(self, record: Record, draw: int | None = None) -> dict[str, Any] | Bad:
        """draw: which draw of the sample this is (training only); None = never timestamped."""
        if record.problem:
            return Bad(record.id, BAD_LINE, record.problem)
        labels = self.labels(record.text)
        if isinstance(labels, Bad):
            return Bad(record.id, labels.reason, labels.detail)
        if record.duration is not None and record.duration > MAX_AUDIO_SECONDS:
            return Bad(record.id, "audio over 30 s", f"{record.duration:.1f} s")
        try:
            audio = decode_audio(record)
        except IsADirectoryError:
            return Bad(record.id, "not an audio file", "is a folder, not an audio file")
        except FileNotFoundError:
            return Bad(record.id, "missing file")
        except Exception as e:  # soundfile raises several types for broken files; name the file, keep going
            return Bad(record.id, "undecodable audio", undecodable_detail(record, e))
        seconds = len(audio) / SAMPLE_RATE
        if seconds < MIN_AUDIO_SECONDS:
            return Bad(record.id, "empty or truncated audio", f"{seconds:.2f} s")
        if seconds > MAX_AUDIO_SECONDS:
            return Bad(record.id, "audio over 30 s", f"{seconds:.1f} s")
        if not np.isfinite(audio).all():
            return Bad(record.id, "NaN or inf in audio")
        if self.timestamped(record.id, draw):
            labels = self.with_timestamps(labels, seconds)
        return {"id": record.id, "input_features": self.log_mel(audio), "labels": labels, "seconds": seconds}


def clean_text(text: str) -> str:
    """The transcript as trained on and scored against: surrounding whitespace stripped, inner runs of
    whitespace (tabs, newlines, double spaces) made one space. Nothing else is changed: casing and
    punctuation are what the model should learn to write."""
    return " ".join(text.split())
class RecordDataset(torch.utils.data.Dataset):
    """Map-style: index -> prepared sample. Indexing (not iteration) keeps resume exact and cheap."""

    def __init__(self, records, prepare: Prepare):
        self.records, self.prepare = records, prepare

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int | tuple[int, int]):
        if isinstance(i, tuple):  # (index, draw) from TrainBatches: the draw decides timestamped or not
            return self.prepare(self.records[i[0]], draw=i[1])
        return self.prepare(self.records[i])


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

    def epoch_batches(self, epoch: int, draws: bool = False) -> list[list]:
        """This process's batches of epoch `epoch`: indices, or (index, draw) pairs with draws=True.

        A draw numbers a sample's place in the whole run (epoch * n + place in the epoch's order), the same
        whatever the number of processes; Prepare hashes it to decide whether the sample is timestamped.
        """
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        places = range(self.rank, (self.n // self.world) * self.world, self.world)
        mine = [(order[p], epoch * self.n + p) if draws else order[p] for p in places]
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start
        while True:
            epoch, offset = divmod(position, self.per_epoch)
            for batch in self.epoch_batches(epoch, draws=True)[offset:]:
                yield batch
                position += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for warnings
        return 2**62
