"""python -m whisper_ft.cli.transcribe: long audio whole (several 30-s windows), every output format
well-formed and consistent, batching that changes nothing, unreadable files reported, not fatal."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BAD, CV_EN, DATA, ROOT

LONG = DATA / "long" / "long_45s.mp3"
CLIPS = [CV_EN / "clips" / f"common_voice_en_{i:06d}.mp3" for i in (1, 9, 17)]


def listening_model(tiny_model: Path, out: Path) -> Path:
    """The tiny model with larger random weights, so its output depends on the audio (at the default
    0.02 scale it says the same for every clip, and a batching bug would go unseen); language and
    task in its generation config, as in a fine-tuned model."""
    import torch
    from transformers import WhisperForConditionalGeneration

    shutil.copytree(tiny_model, out)
    model = WhisperForConditionalGeneration.from_pretrained(out)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed_positions" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.generation_config.language, model.generation_config.task = "en", "transcribe"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(tiny_model, tmp_path_factory) -> Path:
    return listening_model(tiny_model, tmp_path_factory.mktemp("listening") / "model")


def transcribe(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisper_ft.cli.transcribe", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def parse_cues(text: str, sep: str) -> list[tuple[float, float, str]]:
    stamp = r"(\d{2}):(\d{2}):(\d{2})" + re.escape(sep) + r"(\d{3})"
    cues = []
    for block in [b for b in text.strip().split("\n\n") if b]:
        lines = block.split("\n")
        if sep == ",":
            assert lines.pop(0) == str(len(cues) + 1), block  # SRT numbers its cues 1, 2, 3 ...
        m = re.fullmatch(stamp + " --> " + stamp, lines[0])
        assert m, lines[0]
        v = [int(x) for x in m.groups()]
        start = v[0] * 3600 + v[1] * 60 + v[2] + v[3] / 1000
        end = v[4] * 3600 + v[5] * 60 + v[6] + v[7] / 1000
        cues.append((start, end, "\n".join(lines[1:])))
    return cues


@pytest.fixture(scope="module")
def batch_of_two(model, tmp_path_factory):
    """The long file and a short clip in one batch, every format, plus an unreadable and a missing file;
    then, in a batch of its own, the long file's first 30 s (what a truncating transcriber would hear)."""
    import soundfile as sf

    from whisper_ft.transcription import load_audio

    tmp = tmp_path_factory.mktemp("tr")
    cut = tmp / "first_30s.wav"
    sf.write(cut, load_audio(LONG)[: 30 * 16000], 16000, subtype="FLOAT")
    out = tmp / "out"
    proc = transcribe("--model", model, LONG, CLIPS[0], BAD / "corrupt.mp3", out / "missing.wav", cut,
                      "--format", "all", "--batch-size", "2", "--output-dir", out)
    return proc, out


def test_unreadable_files_are_reported_and_the_rest_transcribed(batch_of_two):
    proc, out = batch_of_two
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 input(s) failed, 3 transcribed" in proc.stderr and "Traceback" not in proc.stderr
    assert re.search(r"corrupt\.mp3: unreadable audio", proc.stderr)
    assert re.search(r"missing\.wav: no such file", proc.stderr)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}.{fmt}" for stem in (LONG.stem, CLIPS[0].stem, "first_30s") for fmt in ("txt", "srt", "vtt", "json"))
    assert [Path(line.split("\t")[0]).name for line in proc.stdout.splitlines()] == \
        [LONG.name, CLIPS[0].name, "first_30s.wav"]


def test_long_audio_is_transcribed_whole_with_ordered_segments(batch_of_two):
    _, out = batch_of_two
    data = json.loads((out / f"{LONG.stem}.json").read_text())
    assert data["duration"] == pytest.approx(45.07, abs=0.05) and data["language"] == "en"
    segments = data["segments"]
    assert segments and all(0 <= s["start"] <= s["end"] <= data["duration"] for s in segments)
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments)
    assert all(a["end"] <= b["start"] for a, b in zip(segments, segments[1:]))
    assert max(s["end"] for s in segments) > 30
    # The last 15 s were heard: a transcriber that cut the file at 30 s would say exactly what it says
    # for the first 30 s alone (times aside: they are clamped to each file's own duration).
    cut = json.loads((out / "first_30s.json").read_text())
    assert cut["duration"] == 30.0 and [s["text"] for s in cut["segments"]] != [s["text"] for s in segments]


@pytest.mark.parametrize("stem", [LONG.stem, CLIPS[0].stem])
def test_every_format_says_the_same(batch_of_two, stem):
    _, out = batch_of_two
    data = json.loads((out / f"{stem}.json").read_text())
    expected = [(s["start"], s["end"], s["text"]) for s in data["segments"]]
    assert (out / f"{stem}.txt").read_text() == data["text"] + "\n"
    assert parse_cues((out / f"{stem}.srt").read_text(), ",") == expected
    vtt = (out / f"{stem}.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n") and parse_cues(vtt[len("WEBVTT\n\n"):], ".") == expected
    assert all(text.strip() for _, _, text in expected)


def test_batching_changes_nothing(model, batch_of_two, tmp_path):
    """One file per batch gives the same segments as batches of mixed lengths (padding and masks are right)."""
    from whisper_ft.cli.transcribe import main

    _, together = batch_of_two
    alone = tmp_path / "alone"
    assert main([str(a) for a in ("--model", model, LONG, *CLIPS, "--format", "json", "--batch-size", "1",
                                  "--output-dir", alone)]) == 0
    for stem in (LONG.stem, CLIPS[0].stem):
        assert json.loads((alone / f"{stem}.json").read_text()) == json.loads((together / f"{stem}.json").read_text())
    texts = {json.loads((alone / f"{c.stem}.json").read_text())["text"] for c in CLIPS}
    assert len(texts) > 1  # the model's output depends on the audio: the comparison above means something


def test_long_form_inputs_keep_every_frame():
    """Over 30 s: all frames and a mask to the file's end (long-form); under: one full 30-s window."""
    import numpy as np
    from transformers import WhisperFeatureExtractor

    from whisper_ft.transcription import long_form_inputs

    fe = WhisperFeatureExtractor(feature_size=80)
    long, short = np.zeros(45 * 16000 + 1200, np.float32), np.zeros(16000, np.float32)
    features, mask = long_form_inputs(fe, [long, short])
    assert features.shape == (2, 80, 4507) and mask.sum(-1).tolist() == [4507, 3000]  # 721200 samples / 160
    features, mask = long_form_inputs(fe, [short])
    assert features.shape == (1, 80, 3000) and mask.sum().item() == 3000


def test_language_comes_from_the_model_unless_overridden(model, tiny_model_en):
    from whisper_ft.transcription import TranscribeError, Transcriber, timestamp

    assert Transcriber(str(model)).describe() == {"language": "en", "task": "transcribe"}
    assert Transcriber(str(model), language="French", task="translate").describe() == {"language": "fr",
                                                                                       "task": "translate"}
    with pytest.raises(TranscribeError, match="English-only"):
        Transcriber(str(tiny_model_en), language="fr")
    with pytest.raises(TranscribeError, match="not a language Whisper knows"):
        Transcriber(str(model), language="klingon")
    assert timestamp(3661.5, ",") == "01:01:01,500" and timestamp(0.0004, ".") == "00:00:00.000"
