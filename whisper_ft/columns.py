"""Which table column holds the text and which the audio, and which split names mean the same split.

Shared by every source reader (sources.py for local files, hub_data.py for Hub datasets), so that a
column or split is found the same way wherever the data comes from.
"""

from __future__ import annotations

from typing import Any

from whisper_ft.data import DataError

TEXT_COLUMNS = ("sentence", "text", "transcription", "raw_transcription", "normalized_text", "transcript")
AUDIO_COLUMNS = ("audio", "path", "file", "file_name", "filename", "audio_filepath")
SPLIT_SYNONYMS = {"validation": "dev", "dev": "dev", "valid": "dev"}


def split_names(split: str) -> list[str]:
    """File names a split may have: dev, validation and valid are the same split."""
    return [split] + ([n for n in ("dev", "validation", "valid") if n != split] if split in SPLIT_SYNONYMS else [])


def pick_column(row: dict, chosen: str, candidates: tuple[str, ...], what: str, where: Any) -> str:
    """The column `chosen` (which must exist), else the first of `candidates` present."""
    if chosen:
        if chosen not in row:
            raise DataError(f"{what} column {chosen!r} not in {where}; columns: {', '.join(map(str, row))}")
        return chosen
    for c in candidates:
        if c in row:
            return c
    raise DataError(f"no {what} column in {where} (looked for {', '.join(candidates)}); "
                    f"set {what}_column to one of: {', '.join(map(str, row))}")
