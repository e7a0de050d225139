"""Long-form quality check: does the model still transcribe recordings longer than Whisper's 30-s window?

    python -m whisper_ft.cli.evaluate --config config.yaml --long-form DIR_OR_MANIFEST [--split test]
    python -m whisper_ft.cli.evaluate --config config.yaml --long-form talk.mp3     # with talk.txt beside it

Short-clip WER cannot see what long recordings depend on: timestamps (each 30-s window starts where
the previous one's last timestamp ended) and the leading space that joins one segment to the next.
Held-out clips of a data source (split --split, default eval_split) are joined, with short silences
between them, into recordings of about --long-form-minutes; an audio file with its transcript in a
.txt of the same name (or a folder of such pairs) is used as it is. Each recording is transcribed the
way whisper_ft.transcription does it, and the report gives the WER and CER of the whole transcripts, the
segment count, whether every segment lies inside its audio, and how many segments start without a space (not
for languages written without spaces, where CER is the measure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from whisper_ft.data import SAMPLE_RATE, DataError, clean_text, decode_audio
from whisper_ft.transcription import AUDIO_SUFFIXES, generate_segments, joined_text

GAP_SECONDS = 0.5  # silence between joined clips: a pause between sentences, not a gap Whisper would skip
TOLERANCE = 0.02  # one timestamp step: a segment may end on the grid point just after the audio's end


def recordings_from_files(path: Path) -> list[dict[str, Any]]:
    """An audio file with <stem>.txt beside it, or a folder of such pairs: used as they are."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    out = []
    for audio_path in files:
        text_path = audio_path.with_suffix(".txt")
        if not text_path.is_file():
            raise DataError(f"{audio_path} has no transcript {text_path.name} beside it")
        out.append({"name": audio_path.name, "audio": decode_audio_file(audio_path),
                    "reference": clean_text(text_path.read_text(encoding="utf-8")), "clips": [audio_path.name]})
    return out


def decode_audio_file(path: Path) -> np.ndarray:
    from whisper_ft.data import Record

    try:
        return decode_audio(Record(id=str(path), text="", path=str(path)))
    except Exception as e:  # soundfile raises several types; say which file
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def is_recording_folder(path: Path) -> bool:
    """A folder of long recordings: audio files, each with its .txt, and no manifest or release tables."""
    if not path.is_dir():
        return path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES
    audio = [p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES]
    return bool(audio) and all(p.with_suffix(".txt").is_file() for p in audio)


def join_clips(records, prepare, minutes: float, gap: float = GAP_SECONDS,
               spaces: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Clips in their split's order joined into recordings of about `minutes` each; (recordings, clips skipped).

    Unusable clips (bad transcript, unreadable or over-30-s audio) are skipped and counted. The references are
    joined with a space, or with nothing in a language written without spaces (Language.uses_spaces).
    """
    recordings, current, skipped = [], None, 0
    silence = np.zeros(int(gap * SAMPLE_RATE), np.float32)
    for record in records:
        if prepare.screen(record) is not None:
            skipped += 1
            continue
        try:
            audio = decode_audio(record)
        except Exception:  # a broken clip must not end the check; it is counted
            skipped += 1
            continue
        if not len(audio) or len(audio) > 30 * SAMPLE_RATE or not np.isfinite(audio).all():
            skipped += 1
            continue
        if current is None:
            current = {"name": f"recording-{len(recordings) + 1}", "parts": [], "texts": [], "clips": []}
            recordings.append(current)
        current["parts"] += [silence, audio] if current["parts"] else [audio]
        current["texts"].append(clean_text(record.text))
        current["clips"].append(record.id)
        if sum(len(p) for p in current["parts"]) >= minutes * 60 * SAMPLE_RATE:
            current = None
    joiner = " " if spaces else ""
    return [{"name": r["name"], "audio": np.concatenate(r["parts"]), "reference": joiner.join(r["texts"]),
             "clips": r["clips"]} for r in recordings], skipped


def check(model, processor, recordings: list[dict[str, Any]], kwargs: dict[str, Any], device, dtype,
          batch_size: int = 4, spaces: bool = True) -> dict[str, Any]:
    """Transcribe each recording in long-form mode and measure it; returns the report (JSON-ready).

    spaces=False (a language written without spaces): WER would count a sentence as one word, so CER is the
    measure, and segments are not expected to start with a space (that count is None).
    """
    import jiwer

    from whisper_ft.evaluation import normalize

    tokenizer = processor.tokenizer
    rows = []
    for start in range(0, len(recordings), batch_size):
        batch = recordings[start : start + batch_size]
        for rec, raw in zip(batch, generate_segments(model, processor, [r["audio"] for r in batch], kwargs,
                                                     device, dtype)):
            duration = len(rec["audio"]) / SAMPLE_RATE
            segments = [{"start": round(float(s["start"]), 3), "end": round(float(s["end"]), 3),
                         "text": tokenizer.decode([int(t) for t in s["tokens"]], skip_special_tokens=True)}
                        for s in raw]
            spoken = [s for s in segments if s["text"].strip()]
            outside = [s for s in segments if s["start"] < 0 or s["end"] < s["start"]
                       or s["end"] > duration + TOLERANCE]
            rows.append({"name": rec["name"], "duration": round(duration, 3), "clips": len(rec["clips"]),
                         "reference": rec["reference"], "transcript": joined_text(raw, tokenizer),
                         "segments": len(spoken), "segments_outside_audio": len(outside),
                         "segments_without_leading_space": sum(not s["text"].startswith(" ") for s in spoken)
                         if spaces else None, "segment_list": segments})
    refs = [normalize(r["reference"]) for r in rows]
    hyps = [normalize(r["transcript"]) for r in rows]
    for row, ref, hyp in zip(rows, refs, hyps):
        row["wer"] = round(100 * jiwer.wer(ref, hyp), 2) if ref else None
        row["cer"] = round(100 * jiwer.cer(ref, hyp), 2) if ref else None
    scored = ([r for r in refs if r], [h for r, h in zip(refs, hyps) if r])
    return {
        "recordings": len(rows), "audio_seconds": round(sum(r["duration"] for r in rows), 2),
        "long_form_wer": 100 * jiwer.wer(*scored) if scored[0] else None,
        "long_form_cer": 100 * jiwer.cer(*scored) if scored[0] else None,
        "segments": sum(r["segments"] for r in rows),
        "segments_inside_audio": all(r["segments_outside_audio"] == 0 for r in rows),
        "segments_outside_audio": sum(r["segments_outside_audio"] for r in rows),
        "segments_without_leading_space": sum(r["segments_without_leading_space"] for r in rows) if spaces else None,
        "per_recording": rows,
    }
