"""python -m whisper_ft.cli.export: a CTranslate2 model that faster-whisper can load and that transcribes the
committed clips exactly as the transformers model does (float32, greedy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import CV_EN, ROOT
from test_transcribe import listening_model

# The optional export extra (pip install -r requirements-export.txt); skipped only where it is not installed.
ctranslate2 = pytest.importorskip("ctranslate2")

CLIPS = [CV_EN / "clips" / f"common_voice_en_{i:06d}.mp3" for i in (1, 2, 9, 10, 17, 25)]
NEW_TOKENS = 24


def export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisper_ft.cli.export", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    model = listening_model(tiny_model, tmp / "model")
    out = tmp / "ct2"
    proc = export("--model", model, "--quantization", "float32", "--output-dir", out,
                  "--verify", *CLIPS[:3], "--max-new-tokens", NEW_TOKENS)
    return model, out, proc


@pytest.mark.slow
def test_export_writes_what_faster_whisper_reads(exported):
    model, out, proc = exported
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 of 3 clips transcribed the same" in proc.stderr
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json", "preprocessor_config.json"} <= \
        {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ct2")]  # no temporary folder left
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["feature_size"] == json.loads((model / "config.json").read_text())["num_mel_bins"] == 80
    assert pre["sampling_rate"] == 16000 and pre["hop_length"] == 160 and pre["chunk_length"] == 30
    from transformers import WhisperTokenizer

    assert len(json.loads((out / "vocabulary.json").read_text())) == len(WhisperTokenizer.from_pretrained(model))


@pytest.mark.slow
def test_exported_model_transcribes_like_transformers(exported):
    """Loaded the way faster-whisper loads it (tokenizers' tokenizer.json, preprocessor_config.json), the
    export's greedy transcripts of the clips equal transformers' greedy transcripts, token for token."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    from whisper_ft.transcription import load_audio

    model, out, _ = exported
    audio = [load_audio(c) for c in CLIPS]

    processor = WhisperProcessor.from_pretrained(model)
    hf = WhisperForConditionalGeneration.from_pretrained(model).eval()
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = hf.generate(features, attention_mask=torch.ones(features.shape[::2], dtype=torch.long),
                          language="en", task="transcribe", max_new_tokens=NEW_TOKENS, force_unique_generate_call=True)
    expected = [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    fe = WhisperFeatureExtractor(**json.loads((out / "preprocessor_config.json").read_text()))
    ct2_features = fe(audio, sampling_rate=16000, return_tensors="np").input_features
    prompt = [tokenizer.token_to_id(t) for t in
              ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
    whisper = ctranslate2.models.Whisper(str(out), device="cpu", compute_type="float32")
    results = whisper.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(ct2_features)),
                               [prompt] * len(CLIPS), beam_size=1, max_length=2 * NEW_TOKENS)
    eot = tokenizer.token_to_id("<|endoftext|>")  # faster-whisper keeps the text tokens, those before <|endoftext|>
    got = [tokenizer.decode([t for t in r.sequences_ids[0] if t < eot]).strip() for r in results]
    assert got == expected
    assert len(set(expected)) > 1 and all(expected)  # real, audio-dependent text: the equality means something


def test_existing_output_is_kept_unless_forced(exported, capsys):
    from whisper_ft.cli.export import main

    model, out, _ = exported
    before = (out / "model.bin").stat().st_mtime_ns
    assert main(["--model", str(model), "--output-dir", str(out)]) == 1
    assert "holds a previous ctranslate2 export; pass --force" in capsys.readouterr().err
    assert (out / "model.bin").stat().st_mtime_ns == before


@pytest.mark.slow
def test_missing_ctranslate2_is_a_clear_message(tmp_path):
    code = ("import sys; sys.modules['ctranslate2'] = None\n"  # as if the optional extra were not installed
            "from whisper_ft.cli.export import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--model", str(tmp_path), "--output-dir", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "pip install -r requirements-export.txt" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
