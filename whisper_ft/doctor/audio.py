"""Facts about one clip that training does not check: loudness, clipping, and how much of it is speech.

The speech share is an energy-based voice activity estimate: 30-ms frames whose level is within
SPEECH_RANGE_DB of the clip's loudest frames and above an absolute floor. It is crude (music or loud
noise counts as speech), but enough to find clips that are mostly silence with a word at the edge.
"""

from __future__ import annotations

import math

import numpy as np

from whisper_ft.data import SAMPLE_RATE

FRAME_SECONDS = 0.03
SILENT_DBFS = -50.0  # a clip whose loudest frame is below this is near-silent (speech peaks near -20..-3 dBFS)
SPEECH_FLOOR_DBFS = -55.0  # frames below this are never speech
SPEECH_RANGE_DB = 30.0  # frames within this of the loudest frames (95th percentile) count as speech
LITTLE_SPEECH = 0.15  # speech share below which a clip is flagged
CLIPPED_LEVEL = 0.999  # |sample| at or above this is at full scale
CLIPPED_SHARE = 0.001  # more than 0.1% of samples at full scale: the recording was clipped


def db(x: float) -> float:
    return 20 * math.log10(max(x, 1e-10))


def audio_facts(audio: np.ndarray) -> dict[str, float]:
    """Level (dBFS), peak, full-scale share, speech share and speech seconds of 16-kHz mono float audio."""
    n = int(FRAME_SECONDS * SAMPLE_RATE)
    frames = audio[: len(audio) // n * n].reshape(-1, n) if len(audio) >= n else audio.reshape(1, -1)
    frame_db = 20 * np.log10(np.maximum(np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)), 1e-10))
    loud = float(np.percentile(frame_db, 95)) if len(frame_db) else -200.0
    speech = (frame_db >= max(SPEECH_FLOOR_DBFS, loud - SPEECH_RANGE_DB)) & (frame_db > SPEECH_FLOOR_DBFS)
    share = float(speech.mean()) if len(speech) else 0.0
    rms = float(np.sqrt((audio.astype(np.float64) ** 2).mean())) if len(audio) else 0.0
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    return {"rms_dbfs": round(db(rms), 1), "peak_dbfs": round(db(peak), 1), "loudest_frames_dbfs": round(loud, 1),
            "clipped_share": round(float((np.abs(audio) >= CLIPPED_LEVEL).mean()) if len(audio) else 0.0, 5),
            "speech_share": round(share, 3), "speech_seconds": round(share * len(audio) / SAMPLE_RATE, 2)}


def audio_reasons(facts: dict[str, float]) -> list[tuple[str, str]]:
    """(reason, detail) for what is wrong with a clip's audio, judged from audio_facts."""
    out = []
    if facts["loudest_frames_dbfs"] < SILENT_DBFS:
        out.append(("near-silent audio", f"loudest frames {facts['loudest_frames_dbfs']:.0f} dBFS"))
    elif facts["speech_share"] < LITTLE_SPEECH:
        out.append(("little speech", f"{100 * facts['speech_share']:.0f}% of the clip "
                                     f"({facts['speech_seconds']:.2f} s) is above the speech level"))
    if facts["clipped_share"] > CLIPPED_SHARE:
        out.append(("clipped audio", f"{100 * facts['clipped_share']:.1f}% of samples at full scale"))
    return out
