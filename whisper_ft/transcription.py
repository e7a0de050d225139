"""Transcription of whole recordings: Whisper's long-form generation, segment times kept inside the audio,
and the txt/srt/vtt/json outputs. The command around it is whisper_ft.cli.transcribe; the long-form check
(whisper_ft.long_form) generates the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
HOP = 160  # samples per log-mel frame
WINDOW_FRAMES = 3000  # Whisper's 30-s window in frames
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".au"}  # what soundfile reads
FORMATS = ("txt", "srt", "vtt", "json")


@dataclass
class Segment:
    start: float
    end: float
    text: str


@dataclass
class Transcript:
    path: Path
    duration: float
    text: str = ""
    segments: list[Segment] = field(default_factory=list)


class TranscribeError(Exception):
    pass


class Transcriber:
    """A loaded model and processor; call it with a list of files to get (transcripts, errors)."""

    def __init__(self, model: str, *, language: str = "", task: str = "", device: str = "", dtype: str = "auto",
                 token: str = ""):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from whisper_ft.model import ModelError, from_pretrained

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        try:
            self.processor = from_pretrained(WhisperProcessor, model, token=token or None)
            self.model = from_pretrained(WhisperForConditionalGeneration, model, token=token or None, dtype=self.dtype)
        except ModelError as e:
            raise TranscribeError(str(e)) from None
        self.model.to(self.device).eval()
        self.kwargs = self._language_and_task(language, task)

    def _language_and_task(self, language: str, task: str) -> dict[str, Any]:
        from whisper_ft.languages import LanguageError, resolve
        from whisper_ft.model import is_multilingual

        gen = self.model.generation_config
        if not is_multilingual(self.model):  # an English-only (*.en) model takes no language or task token
            if (language and resolve(language).code != "en") or task == "translate":
                raise TranscribeError("this model is English-only (like *.en): it cannot take --language "
                                      f"{language or 'en'} --task {task or 'transcribe'}")
            return {}
        try:
            code = resolve(language).code if language else getattr(gen, "language", None)
        except LanguageError as e:
            raise TranscribeError(str(e)) from None
        # No language anywhere (an original openai checkpoint): Whisper detects it from the audio.
        return {"language": code, "task": task or getattr(gen, "task", None) or "transcribe"}

    def describe(self) -> dict[str, Any]:
        return {"language": self.kwargs.get("language"), "task": self.kwargs.get("task", "transcribe")}

    def __call__(self, files: list[Path]) -> tuple[list[Transcript], list[tuple[str, str]]]:
        audios, ok, errors = [], [], []
        for path in files:
            try:
                audios.append(load_audio(path))
                ok.append(path)
            except Exception as e:  # soundfile raises several types; name the file and go on with the rest
                errors.append((str(path), f"unreadable audio ({str(e).splitlines()[0][:160] or type(e).__name__})"))
        if not ok:
            return [], errors
        try:
            return self._generate(ok, audios), errors
        except Exception as e:  # e.g. out of memory on one batch: report its files, keep the next batches
            return [], errors + [(str(p), f"transcription failed: {type(e).__name__}: {str(e)[:200]}") for p in ok]

    def _generate(self, files: list[Path], audios: list[np.ndarray]) -> list[Transcript]:
        raw = generate_segments(self.model, self.processor, audios, self.kwargs, self.device, self.dtype)
        tokenizer = self.processor.tokenizer
        transcripts = []
        for path, audio, raw_segments in zip(files, audios, raw):
            duration = len(audio) / SAMPLE_RATE
            segments = clean_segments(raw_segments, duration, tokenizer)
            transcripts.append(Transcript(path, duration, joined_text(raw_segments, tokenizer), segments))
        return transcripts


def generate_segments(model, processor, audios: list[np.ndarray], kwargs: dict[str, Any], device, dtype):
    """Whisper's long-form generation over whole recordings: per recording, its raw segments (start, end,
    tokens) as transformers returns them, times not yet clamped to the audio (the evaluator checks them)."""
    import torch

    features, mask = long_form_inputs(processor.feature_extractor, audios)
    with torch.no_grad():
        out = model.generate(features.to(device, dtype), attention_mask=mask.to(device),
                             return_timestamps=True, return_segments=True, **kwargs)
    return out["segments"]


def joined_text(raw_segments: list[dict[str, Any]], tokenizer) -> str:
    """The whole transcript: every segment's tokens decoded together, so segments join as the model wrote
    them (a model trained without Whisper's leading space glues them: "...down.Open...")."""
    tokens = [int(t) for s in raw_segments for t in s["tokens"]]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def load_audio(path: Path) -> np.ndarray:
    """float32 mono 16 kHz, the same decoding as training (soundfile + soxr, no FFmpeg)."""
    from whisper_ft.data import Record, decode_audio

    audio = decode_audio(Record(id=str(path), text="", path=str(path)))
    if len(audio) == 0:
        raise ValueError("no samples in the file")
    if not np.isfinite(audio).all():
        raise ValueError("NaN or inf samples")
    return audio


def long_form_inputs(feature_extractor, audios: list[np.ndarray]):
    """Log-mel features of whole files, and the frame mask that tells generate() where each one ends.

    Every file is padded to at least 30 s before the log-mel, as Whisper was trained on, so a short
    file gets the same features as in training and evaluation; the mask then says "at least one full
    window" for it. A file over 30 s keeps all its frames: more than 3000 frames with a mask is what
    switches transformers to long-form (sequential 30-s windows) instead of truncating.
    """
    import torch

    longest = max(len(a) for a in audios)
    target = max(WINDOW_FRAMES * HOP, longest)
    padded = [np.pad(a, (0, target - len(a))) for a in audios]
    features = feature_extractor(padded, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False,
                                 padding="longest").input_features
    frames = features.shape[-1]
    mask = torch.zeros(len(audios), frames, dtype=torch.long)
    for i, a in enumerate(audios):
        mask[i, : min(frames, max(WINDOW_FRAMES, -(-len(a) // HOP)))] = 1
    return features, mask


def clean_segments(raw: list[dict[str, Any]], duration: float, tokenizer) -> list[Segment]:
    """Segments with text, times within the audio and never going backwards.

    Whisper may put the last timestamp past the end of the audio (the window is padded with silence);
    players reject cues that go backwards or end before they start.
    """
    segments, last = [], 0.0
    for seg in raw:
        text = tokenizer.decode([int(t) for t in seg["tokens"]], skip_special_tokens=True).strip()
        if not text:
            continue
        start = min(max(float(seg["start"]), last), duration)
        end = min(max(float(seg["end"]), start), duration)
        segments.append(Segment(round(start, 3), round(end, 3), text))
        last = end
    return segments


# ---------------------------------------------------------------------------------------------
# Output formats


def timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: Transcript) -> str:
    return "".join(f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text}\n\n"
                   for i, s in enumerate(t.segments, 1))


def to_vtt(t: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text}\n\n"
                                  for s in t.segments)


def to_json(t: Transcript, info: dict[str, Any]) -> str:
    data = {"file": str(t.path), "duration": round(t.duration, 3), **info, "text": t.text,
            "segments": [{"start": s.start, "end": s.end, "text": s.text} for s in t.segments]}
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def write_outputs(t: Transcript, stem: Path, formats, info: dict[str, Any]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    render = {"txt": lambda: t.text + "\n", "srt": lambda: to_srt(t), "vtt": lambda: to_vtt(t),
              "json": lambda: to_json(t, info)}
    for fmt in formats:
        stem.with_name(f"{stem.name}.{fmt}").write_text(render[fmt](), encoding="utf-8")

