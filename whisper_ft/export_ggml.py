"""A transformers Whisper as the ggml file whisper.cpp loads (the layout of whisper.cpp's
models/convert-h5-to-ggml.py): hyper-parameters, the mel filter bank, the vocabulary, the tensors.

Two things this writer does that hand conversions often get wrong:
- the mel filters come from the model's own feature extractor (librosa's Slaney filters, the ones openai
  ships in mel_filters.npz), so 128-bin models (large-v3) get 128 filters, not a copied 80-bin table;
- the vocabulary is the model's own byte-level BPE, decoded to bytes, so a fine-tune's tokenizer (not
  openai's) is what whisper.cpp detokenizes with.
whisper.cpp places the special tokens by the vocabulary size alone (51864: English-only, 51865: 99
languages, 51866: 100 languages): a model whose special tokens sit elsewhere cannot be read correctly by
it, so the export refuses it with a message instead of writing a file that transcribes nonsense.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from whisper_ft.export_openai import openai_name

FILENAME = "ggml-model.bin"
GGML_MAGIC = 0x67676D6C
# Tensors whisper.cpp keeps in float32 even in a float16 file (convert-h5-to-ggml.py's list).
F32_NAMES = ("encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding",
             "decoder.positional_embedding")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def whisper_cpp_layout(n_vocab: int) -> dict[str, int]:
    """The special-token ids whisper.cpp assumes for a vocabulary of n_vocab (src/whisper.cpp, whisper_vocab)."""
    multilingual = n_vocab >= 51865
    n_langs = n_vocab - 51765 - int(multilingual)
    dt = n_langs - 98 if multilingual else 0
    eot = 50256 + int(multilingual)
    return {"<|endoftext|>": eot, "<|startoftranscript|>": eot + 1, "<|translate|>": 50357 + dt,
            "<|transcribe|>": 50358 + dt, "<|startoflm|>": 50359 + dt, "<|startofprev|>": 50360 + dt,
            "<|nospeech|>": 50361 + dt, "<|notimestamps|>": 50362 + dt}


def check_vocabulary(tokenizer, n_vocab: int) -> None:
    if n_vocab not in (51864, 51865, 51866):
        raise ValueError(f"whisper.cpp reads only Whisper's vocabulary sizes (51864, 51865, 51866); this model "
                         f"has {n_vocab}")
    vocab = tokenizer.get_vocab()
    # Older tokenizers name <|nospeech|> <|nocaptions|>: check the tokens this one has, and the four it needs.
    required = ("<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>")
    wrong = [f"{t} is {vocab.get(t, 'missing')}, whisper.cpp expects {i}"
             for t, i in whisper_cpp_layout(n_vocab).items() if (t in vocab or t in required) and vocab.get(t) != i]
    if wrong:
        raise ValueError("the model's special tokens are not where whisper.cpp looks for them: " + "; ".join(wrong))


def text_tokens(tokenizer) -> list[bytes]:
    """The BPE tokens (ids 0 .. eot-1, and eot itself as whisper.cpp's files have it) as raw bytes."""
    decoder = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = tokenizer.get_vocab()
    added = set(tokenizer.get_added_vocab())
    by_id = {i: t for t, i in vocab.items() if t not in added}
    n = max(by_id) + 1
    if sorted(by_id) != list(range(n)):
        raise ValueError("the tokenizer's BPE ids are not contiguous from 0; whisper.cpp needs them so")
    return [bytes(decoder[c] for c in by_id[i]) for i in range(n)]


def mel_filters(feature_extractor) -> np.ndarray:
    """(n_mels, n_fft/2+1) float32: transformers keeps the same Slaney filters transposed."""
    return np.ascontiguousarray(np.asarray(feature_extractor.mel_filters, dtype=np.float32).T)


def export_ggml(model, processor, out_dir: Path, half: bool = True) -> dict:
    """Write out_dir/ggml-model.bin; returns what the marker records."""
    import torch

    cfg = model.config
    check_vocabulary(processor.tokenizer, cfg.vocab_size)
    if not torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight):
        raise ValueError("the model's output projection differs from its token embedding; whisper.cpp ties "
                         "the two, so this model cannot be exported to it")
    filters = mel_filters(processor.feature_extractor)
    if filters.shape[0] != cfg.num_mel_bins:
        raise ValueError(f"the feature extractor has {filters.shape[0]} mel bins, the model {cfg.num_mel_bins}")
    tokens = text_tokens(processor.tokenizer)
    with open(out_dir / FILENAME, "wb") as f:
        f.write(struct.pack("i" * 12, GGML_MAGIC, cfg.vocab_size, cfg.max_source_positions, cfg.d_model,
                            cfg.encoder_attention_heads, cfg.encoder_layers, cfg.max_target_positions, cfg.d_model,
                            cfg.decoder_attention_heads, cfg.decoder_layers, cfg.num_mel_bins, int(half)))
        f.write(struct.pack("ii", *filters.shape))
        f.write(filters.tobytes())
        f.write(struct.pack("i", len(tokens)))
        for t in tokens:
            f.write(struct.pack("i", len(t)))
            f.write(t)
        for hf_name, tensor in model.state_dict().items():
            name = openai_name(hf_name)
            if name is None:
                continue
            data = tensor.detach().float().squeeze().numpy()
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                data = data.reshape(data.shape[0], 1)
            f16 = half and data.ndim >= 2 and name not in F32_NAMES
            data = data.astype(np.float16 if f16 else np.float32)
            encoded = name.encode()
            f.write(struct.pack("iii", data.ndim, len(encoded), int(f16)))
            f.write(struct.pack("i" * data.ndim, *reversed(data.shape)))
            f.write(encoded)
            f.write(np.ascontiguousarray(data).tobytes())
    return {"file": FILENAME, "dtype": "float16" if half else "float32"}


def transcribe_ggml(exported: Path, audios: list[np.ndarray], language: str | None, max_new_tokens: int,
                    threads: int = 1) -> list[str]:
    """Greedy, no-timestamp text of each clip's first 30 s by whisper.cpp (pywhispercpp) on the export."""
    from pywhispercpp.model import Model

    model = Model(str(exported / FILENAME), n_threads=threads, print_progress=False, print_realtime=False,
                  redirect_whispercpp_logs_to=None)
    out = []
    for audio in audios:
        segments = model.transcribe(audio[:30 * 16_000].astype(np.float32), language=language or "en", no_timestamps=True,
                                    single_segment=True, temperature=0.0, temperature_inc=0.0,
                                    max_tokens=max_new_tokens, no_context=True)
        out.append("".join(s.text for s in segments).strip())
    return out
