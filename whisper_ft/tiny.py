"""Build a tiny, randomly initialised Whisper with a Whisper-compatible tokenizer, offline.

Used by the demo (`configs/demo.yaml`) and the tests: no Hub access is needed, yet every piece
(special-token layout, generation config with language/task ids, feature extractor) matches a real
Whisper checkpoint, so the training loop cannot tell the difference.

    python -m whisper_ft.tiny OUT_DIR --texts-from tests/data/cv-en/validated.tsv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

N_TIMESTAMPS = 1501  # <|0.00|> … <|30.00|> in 0.02 s steps, as in every Whisper checkpoint


def special_tokens(multilingual: bool = True) -> list[str]:
    """Whisper's special tokens in checkpoint order: language ids are sot+1+index, as the tokenizer assumes."""
    langs = [f"<|{code}|>" for code in LANGUAGES] if multilingual else []
    return ["<|endoftext|>", "<|startoftranscript|>", *langs, "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]


def build_tokenizer(texts: list[str], vocab_size: int = 600, multilingual: bool = True,
                    total_size: int | None = None, named_timestamps: bool = True) -> WhisperTokenizer:
    """A byte-level BPE trained on texts, then Whisper's special and timestamp tokens after it.

    named_timestamps=False leaves out the <|0.00|> ... <|30.00|> tokens, as many exports and community
    fine-tunes do: the timestamp ids then exist only in the model (see build), right after <|notimestamps|>.
    total_size: make the vocabulary, timestamps included, exactly this (51865 for multilingual Whisper, 51866
    for large-v3) by filling the BPE vocabulary with words that no merge produces, so a model built on it has
    the real embedding and output-projection sizes (what benchmarks need) while the BPE stays small.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Words appear both sentence-initially and after a space: train on both forms.
    bpe.train_from_iterator(texts + [" " + t for t in texts], trainer)
    state = bpe.model
    vocab = bpe.get_vocab()
    if total_size is not None:
        n_fill = total_size - len(vocab) - len(special_tokens(multilingual)) - N_TIMESTAMPS
        if n_fill < 0:
            raise ValueError(f"total_size {total_size} is below the {total_size - n_fill} tokens already needed")
        letters = "abcdefghijklmnopqrstuvwxyz"
        for i in range(n_fill):  # "qz" + base-26 digits: plain letters, valid in the byte-level alphabet
            word, k = "", i
            while True:
                word, k = letters[k % 26] + word, k // 26
                if not k:
                    break
            vocab["Ġqz" + word] = len(vocab)
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" "))
              for m in _merges_of(bpe)]
    del state
    tok = WhisperTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": special_tokens(multilingual)})
    if named_timestamps:
        tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)])
    return tok


def _merges_of(bpe: Tokenizer) -> list:
    import json
    return json.loads(bpe.to_str())["model"]["merges"]


def build(out_dir: str | Path, texts: list[str], d_model: int = 64, layers: int = 2, seed: int = 0,
          multilingual: bool = True, init_std: float = 0.2, *, decoder_layers: int | None = None, heads: int = 4,
          ffn_dim: int | None = None, num_mel_bins: int = 80, vocab_size: int | None = None,
          named_timestamps: bool = True) -> Path:
    """Write a complete tiny Whisper checkpoint (model, processor, generation config) to out_dir.

    The keyword-only arguments give any Whisper shape (bench/bench_gpu.py builds tiny ... large-v3 with
    them): `layers` is then the encoder's, `vocab_size` the tokenizer's and model's total (see
    build_tokenizer), `num_mel_bins` 128 for large-v3.
    A tiny model with num_mel_bins=128 has large-v3's whole layout: its special tokens (100 languages,
    <|yue|> last, so every token after the languages is one further than in the 99-language v1/v2
    checkpoints: vocab 51866, not 51865) are what transformers' language list gives every model here.

    named_timestamps=False: a tokenizer without <|0.00|> ... <|30.00|> (see build_tokenizer); the model's
    vocabulary still holds their ids, as in such exports of real checkpoints.

    init_std 0.2, not Whisper's 0.02: at width 64 the small init leaves cross-attention near uniform
    over 1500 mostly silent frames, and the model learns the transcripts' language model long before
    it learns to read the audio (WER stuck near 80% after 300 steps; with 0.2 it is 0% after 100).
    """
    import torch

    out_dir = Path(out_dir)
    tok = build_tokenizer(texts, multilingual=multilingual, total_size=vocab_size, named_timestamps=named_timestamps)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special_tokens(multilingual)}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tok) + (0 if named_timestamps else N_TIMESTAMPS), num_mel_bins=num_mel_bins, d_model=d_model,
        encoder_layers=layers, decoder_layers=layers if decoder_layers is None else decoder_layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim or 4 * d_model, decoder_ffn_dim=ffn_dim or 4 * d_model,
        max_source_positions=1500, max_target_positions=448, init_std=init_std,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    gen = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=448, begin_suppress_tokens=[eot], suppress_tokens=[],
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50, is_multilingual=multilingual,
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        lang_to_id={t: i for t, i in ids.items() if t[2:-2] in LANGUAGES} if multilingual else {},
    )
    if not multilingual:
        del gen.task_to_id, gen.lang_to_id
    model.generation_config = gen
    model.save_pretrained(out_dir)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=num_mel_bins), tokenizer=tok).save_pretrained(out_dir)
    return out_dir


def texts_from_tsv(path: str | Path, column: str = "sentence") -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row[column] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--texts-from", nargs="+", required=True, help="Common Voice TSV files whose sentences train the BPE")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--english-only", action="store_true", help="no language tokens, like *.en checkpoints")
    args = p.parse_args(argv)
    texts = [t for path in args.texts_from for t in texts_from_tsv(path)]
    build(args.out_dir, texts, d_model=args.d_model, layers=args.layers, multilingual=not args.english_only)
    print(f"tiny Whisper written to {args.out_dir}")


if __name__ == "__main__":
    main()
