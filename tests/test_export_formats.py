"""python -m whisper_ft.cli.export --format openai|ggml: files that openai-whisper and whisper.cpp load, the
openai export transcribing the committed clips token for token as transformers does (float32, greedy), and
an output folder that is never a run, the input model or foreign files."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CV_AS, CV_EN, ROOT

CLIPS = [CV_EN / "clips" / f"common_voice_en_{i:06d}.mp3" for i in (1, 2, 9, 25)]
NEW_TOKENS = 16


def whisper_layout_model(out: Path, num_mel_bins: int = 80, english_only: bool = False) -> Path:
    """A tiny Whisper with Whisper's real vocabulary layout, which whisper.cpp, openai-whisper and sherpa-onnx
    assume: multilingual with large-v3's 51866 ids (the BPE fills ids up to <|endoftext|> at 50257, then 100
    languages), or English-only with tiny.en's 51864 (<|endoftext|> at 50256, then the first checkpoints' 99
    languages, which *.en tokenizers keep though the model never uses them). Larger random weights so the
    output depends on the audio; language and task set in the multilingual one, as in a fine-tuned model."""
    from transformers import WhisperForConditionalGeneration

    from whisper_ft import tiny

    texts = tiny.texts_from_tsv(CV_EN / "validated.tsv") + tiny.texts_from_tsv(CV_AS / "train.tsv")
    if english_only:
        with pytest.MonkeyPatch.context() as mp:  # the 99 languages before <|yue|> was added
            mp.setattr(tiny, "LANGUAGES", {k: v for k, v in tiny.LANGUAGES.items() if k != "yue"})
            tiny.build(out, texts, vocab_size=51864, num_mel_bins=num_mel_bins)
    else:
        tiny.build(out, texts, vocab_size=51866, num_mel_bins=num_mel_bins)
    model = WhisperForConditionalGeneration.from_pretrained(out)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed_positions" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    gen = model.generation_config
    if english_only:  # as whisper-tiny.en's generation config: no language or task ids
        gen.is_multilingual = False
        del gen.lang_to_id, gen.task_to_id
    else:
        gen.language, gen.task = "en", "transcribe"
    gen.alignment_heads = [[1, 0], [1, 3]]
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model80(tmp_path_factory) -> Path:
    return whisper_layout_model(tmp_path_factory.mktemp("m80") / "model")


@pytest.fixture(scope="module")
def model128(tmp_path_factory) -> Path:
    return whisper_layout_model(tmp_path_factory.mktemp("m128") / "model", num_mel_bins=128)


@pytest.fixture(scope="module")
def model_en(tmp_path_factory) -> Path:
    return whisper_layout_model(tmp_path_factory.mktemp("men") / "model", english_only=True)


@pytest.fixture
def layout_model(request) -> Path:
    """The layout model a test is parametrized with (indirect): "80", "128" (multilingual) or "en"."""
    return request.getfixturevalue({"80": "model80", "128": "model128", "en": "model_en"}[request.param])


LAYOUTS = ["en", "80", "128"]


def run(*args, capsys=None) -> tuple[int, str]:
    from whisper_ft.cli.export import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err if capsys else ""


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("layout_model", LAYOUTS, indirect=True)
def test_openai_export_loads_and_transcribes_like_transformers(layout_model, tmp_path, capsys):
    whisper = pytest.importorskip("whisper")
    model = layout_model
    out = tmp_path / "oa"
    code, err = run("--model", model, "--format", "openai", "--quantization", "float32", "--output-dir", out,
                    "--verify", *CLIPS, "--max-new-tokens", NEW_TOKENS, capsys=capsys)
    assert code == 0, err[-3000:]
    assert f"{len(CLIPS)} of {len(CLIPS)} clips transcribed the same" in err
    loaded = whisper.load_model(str(out / "model.pt"), device="cpu")
    cfg = json.loads((model / "config.json").read_text())
    assert (loaded.dims.n_mels, loaded.dims.n_vocab, loaded.dims.n_text_layer) == \
        (cfg["num_mel_bins"], cfg["vocab_size"], cfg["decoder_layers"])
    if cfg["vocab_size"] == 51864:
        assert not loaded.is_multilingual
    else:
        assert loaded.is_multilingual and loaded.num_languages == 100
    # The alignment heads in openai's own encoding: set_alignment_heads accepts them.
    loaded.set_alignment_heads(torch.load(out / "model.pt", weights_only=True)["alignment_heads"])
    assert loaded.alignment_heads.to_dense().nonzero().tolist() == [[1, 0], [1, 3]]
    assert json.loads((out / "whisper-ft-export.json").read_text())["format"] == "openai"
    # The transcripts compared are real, audio-dependent text: the agreement means something.
    texts = [line.split("transformers:", 1)[1].strip() for line in err.splitlines() if "transformers:" in line]
    assert len(set(texts)) > 1 and all(texts)


@pytest.mark.slow
@pytest.mark.parametrize("layout_model", LAYOUTS, indirect=True)
@pytest.mark.parametrize("fmt,label", [("ctranslate2", "ctranslate2"), ("onnx", "onnx (onnxruntime)")])
def test_float32_ctranslate2_and_onnx_transcribe_like_transformers(fmt, label, layout_model, tmp_path, capsys):
    """English-only, multilingual and 128-bin: CTranslate2 and the ONNX graphs give transformers' transcripts."""
    pytest.importorskip("ctranslate2" if fmt == "ctranslate2" else "onnxruntime")
    if fmt == "onnx":
        pytest.importorskip("sherpa_onnx")
        pytest.importorskip("whisper")
    code, err = run("--model", layout_model, "--format", fmt, "--quantization", "float32", "--output-dir",
                    tmp_path / "o", "--verify", *CLIPS, "--max-new-tokens", NEW_TOKENS, capsys=capsys)
    assert code == 0, err[-3000:]
    assert f"{len(CLIPS)} of {len(CLIPS)} clips transcribed the same by transformers and the {label} export" in err
    texts = [line.split("transformers:", 1)[1].strip() for line in err.splitlines() if "transformers:" in line]
    assert len(set(texts)) > 1 and all(texts)  # real, audio-dependent text: the agreement means something


@pytest.mark.slow
def test_verify_fails_when_the_export_transcribes_differently(model80, tmp_path, capsys):
    """--verify's verdict: a float32 export whose weights were changed after export must be reported."""
    pytest.importorskip("whisper")
    from whisper_ft.cli.export import verify

    out = tmp_path / "oa"
    assert run("--model", model80, "--format", "openai", "--quantization", "float32", "--output-dir", out)[0] == 0
    ckpt = torch.load(out / "model.pt", weights_only=True)
    ckpt["model_state_dict"]["decoder.ln.weight"] *= -1.0
    torch.save(ckpt, out / "model.pt")
    capsys.readouterr()
    assert verify(str(model80), "openai", out, CLIPS[:2], exact=True, max_new_tokens=NEW_TOKENS) == 1
    err = capsys.readouterr().err
    assert "0 of 2 clips transcribed the same" in err and "must transcribe exactly" in err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["openai", "onnx", "ctranslate2"])
def test_verify_exit_status_catches_an_exporter_that_writes_wrong_weights(fmt, model80, tmp_path, capsys, monkeypatch):
    """The command itself exits 1 when the float32 file it wrote transcribes differently: here an exporter
    with a bug (the decoder's final layer norm negated before writing)."""
    import importlib

    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    if fmt == "ctranslate2":  # the converter reads a folder: give it a copy with the bug
        pytest.importorskip("ctranslate2")
        module = importlib.import_module("whisper_ft.cli.export")
        original = module.export_ctranslate2

        def buggy(model, tmp, quantization):
            broken = WhisperForConditionalGeneration.from_pretrained(model)
            with torch.no_grad():
                broken.model.decoder.layer_norm.weight.mul_(-1.0)
            broken.save_pretrained(tmp_path / "broken")
            WhisperProcessor.from_pretrained(model).save_pretrained(tmp_path / "broken")
            return original(str(tmp_path / "broken"), tmp, quantization)
    else:
        pytest.importorskip("whisper")
        if fmt == "onnx":
            pytest.importorskip("onnxruntime")
            pytest.importorskip("sherpa_onnx")
        module = importlib.import_module(f"whisper_ft.export_{fmt}")
        original = getattr(module, f"export_{fmt}")

        def buggy(model, *args, **kwargs):
            with torch.no_grad():
                model.model.decoder.layer_norm.weight.mul_(-1.0)
            return original(model, *args, **kwargs)

    monkeypatch.setattr(module, f"export_{fmt}", buggy)
    code, err = run("--model", model80, "--format", fmt, "--quantization", "float32", "--output-dir", tmp_path / "o",
                    "--verify", *CLIPS[:2], "--max-new-tokens", NEW_TOKENS, capsys=capsys)
    assert code == 1 and "must transcribe exactly like the model; it does not" in err
    assert "0 of 2 clips transcribed the same" in err and "Traceback" not in err


def read_ggml(path: Path) -> tuple[list[int], np.ndarray, list[bytes], dict[str, tuple[int, tuple]]]:
    """Parse the file the way whisper.cpp's loader does: hparams, mel filters, vocabulary, tensor headers."""
    data = path.read_bytes()
    hp = list(struct.unpack_from("12i", data, 0))
    pos = 48
    rows, cols = struct.unpack_from("ii", data, pos)
    pos += 8
    filters = np.frombuffer(data, np.float32, rows * cols, pos).reshape(rows, cols)
    pos += 4 * rows * cols
    (n,) = struct.unpack_from("i", data, pos)
    pos += 4
    words = []
    for _ in range(n):
        (length,) = struct.unpack_from("i", data, pos)
        words.append(data[pos + 4:pos + 4 + length])
        pos += 4 + length
    tensors = {}
    while pos < len(data):
        ndim, name_len, ftype = struct.unpack_from("iii", data, pos)
        pos += 12
        shape = struct.unpack_from(f"{ndim}i", data, pos)
        pos += 4 * ndim
        name = data[pos:pos + name_len].decode()
        pos += name_len + int(np.prod(shape)) * (2 if ftype == 1 else 4)
        tensors[name] = (ftype, shape)
    assert pos == len(data)
    return hp, filters, words, tensors


@pytest.mark.slow
@pytest.mark.parametrize("layout_model", LAYOUTS, indirect=True)
def test_ggml_export_has_the_model_filters_vocabulary_and_loads_in_whisper_cpp(layout_model, tmp_path, capsys):
    whisper = pytest.importorskip("whisper")
    pytest.importorskip("pywhispercpp")
    from transformers import WhisperTokenizer

    from whisper_ft.export_ggml import transcribe_ggml
    from whisper_ft.transcription import load_audio

    model = layout_model
    out = tmp_path / "gg"
    code, err = run("--model", model, "--format", "ggml", "--output-dir", out, capsys=capsys)
    assert code == 0, err[-3000:]
    hp, filters, words, tensors = read_ggml(out / "ggml-model.bin")
    cfg = json.loads((model / "config.json").read_text())
    bins, n_vocab = cfg["num_mel_bins"], cfg["vocab_size"]
    assert hp[0] == 0x67676D6C and hp[1] == n_vocab and hp[10] == bins and hp[11] == 1
    # openai's own filter bank (librosa Slaney filters, shipped with openai-whisper) as the independent reference
    with np.load(Path(whisper.__file__).parent / "assets" / "mel_filters.npz") as f:
        np.testing.assert_allclose(filters, f[f"mel_{bins}"], atol=1e-6)
    tok = WhisperTokenizer.from_pretrained(model)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert len(words) == eot == (50256 if n_vocab == 51864 else 50257)
    merged = [i for i in range(256, 600) if "\ufffd" not in tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])]
    assert len(merged) > 100
    for i in merged:  # the model's own BPE tokens (merges, whole characters), as the bytes they stand for
        assert words[i] == tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]).encode()
    assert tensors["decoder.token_embedding.weight"] == (1, (cfg["d_model"], n_vocab))
    assert tensors["encoder.positional_embedding"][0] == 0  # whisper.cpp reads these in float32
    assert "decoder.proj.weight" not in tensors  # tied to the token embedding
    # whisper.cpp loads it and detokenizes with the model's vocabulary: every word is one of the BPE's.
    texts = transcribe_ggml(out, [load_audio(c) for c in CLIPS[:2]], "en", NEW_TOKENS)
    known = {tok.convert_tokens_to_string([t]).strip() for t in tok.get_vocab()}
    words_out = [w.replace("\ufffd", "") for t in texts for w in t.split()]  # a word may end in a partial byte
    assert all(texts) and sum(w in known for w in words_out) >= 0.8 * len(words_out)


@pytest.mark.parametrize("fmt", ["ggml", "openai", "onnx"])
def test_a_vocabulary_the_runtimes_cannot_read_is_refused(fmt, tiny_model_en, tmp_path, capsys):
    """The English-only tiny model has a 2k vocabulary without language tokens: whisper.cpp, openai-whisper and
    sherpa-onnx's metadata all place <|endoftext|> by the vocabulary size (50256 for 51864 ids)."""
    code, err = run("--model", tiny_model_en, "--format", fmt, "--output-dir", tmp_path / "gg", capsys=capsys)
    if "is not installed" in err:
        pytest.skip(err)
    assert code == 1 and "vocabulary sizes (51864, 51865, 51866)" in err and "Traceback" not in err
    assert not (tmp_path / "gg").exists() and not list(tmp_path.iterdir())


# --- the output folder: never a run, the input model, a folder holding it, or files this tool did not write


def make_run(folder: Path) -> None:
    (folder / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    (folder / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')


@pytest.mark.parametrize("case", ["run", "input", "parent_of_input", "inside_input", "foreign", "other_format",
                                  "file"])
def test_force_never_replaces_what_export_did_not_write(case, model80, tmp_path, capsys):
    import shutil

    model = tmp_path / "run" / "final"
    shutil.copytree(model80, model)
    make_run(tmp_path / "run")
    make_run(tmp_path / "other-run")
    out = {"run": tmp_path / "other-run", "input": model, "parent_of_input": tmp_path, "inside_input": model / "export",
           "foreign": tmp_path / "mine", "other_format": tmp_path / "prev", "file": tmp_path / "a.txt"}[case]
    if case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    if case == "other_format":
        out.mkdir()
        (out / "ggml-model.bin").write_bytes(b"x")
        (out / "whisper-ft-export.json").write_text('{"format": "ggml"}')
    if case == "file":
        out.write_text("mine")
    before = checksums(tmp_path)
    code, err = run("--model", model, "--format", "openai", "--output-dir", out, "--force", capsys=capsys)
    assert code == 1
    expected = {"run": "holds a training run", "input": "is the input model", "parent_of_input": "holding the input",
                "inside_input": "inside the input model", "foreign": "did not write", "other_format": "a ggml export",
                "file": "is a file"}[case]
    assert expected in err and "Traceback" not in err
    assert checksums(tmp_path) == before


def test_a_previous_export_of_the_same_format_is_replaced_only_with_force(model80, tmp_path, capsys):
    out = tmp_path / "oa"
    assert run("--model", model80, "--format", "openai", "--output-dir", out, capsys=capsys)[0] == 0
    before = checksums(out)
    code, err = run("--model", model80, "--format", "openai", "--output-dir", out, capsys=capsys)
    assert code == 1 and "pass --force" in err and checksums(out) == before
    first = torch.load(out / "model.pt", weights_only=True)["model_state_dict"]
    (out / "model.pt").write_bytes(b"stale")
    code, err = run("--model", model80, "--format", "openai", "--output-dir", out, "--force", capsys=capsys)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["model.pt", "whisper-ft-export.json"]
    again = torch.load(out / "model.pt", weights_only=True)["model_state_dict"]  # the stale file was replaced
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.slow
@pytest.mark.parametrize("fmt,module,package", [("openai", "whisper", "openai-whisper"),
                                                ("ggml", "pywhispercpp", "pywhispercpp")])
def test_missing_runtime_is_a_clear_message(fmt, module, package, tmp_path):
    code = (f"import sys; sys.modules[{module!r}] = None\n"  # as if the optional extra were not installed
            "from whisper_ft.cli.export import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--model", str(tmp_path), "--format", fmt, "--output-dir",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"pip install {package}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
