"""python -m whisper_ft.cli.export --format onnx: the files sherpa-onnx's Whisper recognizer loads, whose graphs
transcribe the committed clips token for token as transformers does (float32, greedy, onnxruntime on the same
features), with the metadata and tokens.txt taken from the model's own tokenizer."""

from __future__ import annotations

import base64
import json

import pytest

from test_export_formats import CLIPS, NEW_TOKENS, run, whisper_layout_model

pytest.importorskip("sherpa_onnx")
pytest.importorskip("whisper")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    model = whisper_layout_model(tmp / "model", num_mel_bins=128)
    return model, tmp / "onnx"


@pytest.mark.slow
def test_onnx_export_loads_in_sherpa_onnx_and_its_graphs_transcribe_like_transformers(exported, capsys):
    from transformers import WhisperTokenizer

    from whisper_ft.export_onnx import transcribe_onnx
    from whisper_ft.transcription import load_audio

    model, out = exported
    code, err = run("--model", model, "--format", "onnx", "--quantization", "float32", "--output-dir", out,
                    "--verify", *CLIPS, "--max-new-tokens", NEW_TOKENS, capsys=capsys)
    assert code == 0, err[-3000:]
    assert f"{len(CLIPS)} of {len(CLIPS)} clips transcribed the same by transformers and the onnx (onnxruntime)" in err
    assert {"encoder.onnx", "decoder.onnx", "tokens.txt", "encoder.int8.onnx", "decoder.int8.onnx",
            "whisper-ft-export.json"} == {p.name for p in out.iterdir()}
    tok = WhisperTokenizer.from_pretrained(model)
    meta = {p.key: p.value for p in onnx.load(str(out / "encoder.onnx"), load_external_data=False).metadata_props}
    cfg = json.loads((model / "config.json").read_text())
    assert int(meta["n_mels"]) == 128 and int(meta["n_vocab"]) == 51866
    assert int(meta["n_text_layer"]) == cfg["decoder_layers"] and int(meta["n_text_state"]) == cfg["d_model"]
    for key, token in (("sot", "<|startoftranscript|>"), ("eot", "<|endoftext|>"), ("transcribe", "<|transcribe|>"),
                       ("no_timestamps", "<|notimestamps|>"), ("translate", "<|translate|>")):
        assert int(meta[key]) == tok.convert_tokens_to_ids(token)
    codes = meta["all_language_codes"].split(",")
    assert len(codes) == 100 and codes[0] == "en"
    assert [int(i) for i in meta["all_language_tokens"].split(",")][:2] == \
        [tok.convert_tokens_to_ids("<|en|>"), tok.convert_tokens_to_ids("<|zh|>")]
    lines = (out / "tokens.txt").read_text().splitlines()
    assert len(lines) == 50257
    merged = [i for i in range(256, 600) if "\ufffd" not in tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])]
    assert len(merged) > 100
    for i in merged:  # the model's own BPE tokens (whole characters), base64 of the bytes they stand for
        b64, idx = lines[i].split()
        assert int(idx) == i
        assert base64.b64decode(b64) == tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]).encode()
    # sherpa-onnx loads the float32 and int8 pairs and detokenizes with the model's own vocabulary.
    known = {tok.convert_tokens_to_string([t]).strip() for t in tok.get_vocab()}
    audio = [load_audio(c) for c in CLIPS[:2]]
    for int8 in (False, True):
        texts = transcribe_onnx(out, audio, "en", int8=int8)
        words = [w.replace("\ufffd", "") for t in texts for w in t.split()]
        assert all(texts) and sum(w in known for w in words) >= 0.8 * len(words)


def test_encoder_input_is_whisper_30s_window_whatever_sherpa_passes():
    """sherpa-onnx passes the clip's normalised log-mel frames and then zero frames (fewer than 3000); the exported
    encoder must see what Whisper's feature extractor gives for the clip padded with silence to 30 s: the
    silence frames hold the clip's largest value minus 2. Checked against transformers' own extractor."""
    import numpy as np
    import torch
    from transformers import WhisperFeatureExtractor

    from whisper_ft.export_onnx import whisper_window

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(16_000 * 3)).astype(np.float32)
    full = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16_000, return_tensors="pt").input_features
    real = 300  # 3 s of audio: frames 0..299 are the clip's, the rest Whisper's silence
    sherpa_like = torch.cat([full[:, :, :real], torch.zeros(1, 80, 1000)], dim=2)
    window = whisper_window(sherpa_like, 3000)
    assert window.shape == (1, 80, 3000)
    torch.testing.assert_close(window[:, :, :real], full[:, :, :real], rtol=0, atol=0)
    # the silence frames: transformers' value (max - 2 of the normalised log-mel), to float rounding
    torch.testing.assert_close(window[:, :, real + 2:], full[:, :, real + 2:], rtol=0, atol=1e-6)
    assert torch.equal(whisper_window(full, 3000), full)  # a full window, as transformers gives, is unchanged
    silence = whisper_window(torch.zeros(1, 80, 500), 3000)  # no audio at all: Whisper's digital-silence value
    assert torch.equal(silence, torch.full((1, 80, 3000), -1.5))
