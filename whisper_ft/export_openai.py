"""A transformers Whisper as the `.pt` checkpoint that openai-whisper's `whisper.load_model(path)` loads.

The checkpoint is {"dims": ..., "model_state_dict": ...} with openai's parameter names (the inverse of
transformers' convert_openai_to_hf.py), plus "alignment_heads" in openai's own encoding when the generation
config names them: load_model reads alignment heads only for its named models, so word timestamps with
an exported file need `model.set_alignment_heads(torch.load(path)["alignment_heads"])`.
"""

from __future__ import annotations

import base64
import gzip
import re
from pathlib import Path

import numpy as np

FILENAME = "model.pt"

_LAYER = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln", "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
_TOP = {
    "encoder.conv1": "encoder.conv1", "encoder.conv2": "encoder.conv2",
    "encoder.embed_positions.weight": "encoder.positional_embedding", "encoder.layer_norm": "encoder.ln_post",
    "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "decoder.embed_positions.weight": "decoder.positional_embedding", "decoder.layer_norm": "decoder.ln",
}


def openai_name(hf_name: str) -> str | None:
    """openai-whisper's name for a transformers parameter; None for proj_out (tied to the token embedding)."""
    name = hf_name.removeprefix("model.")
    if name.startswith("proj_out."):
        return None
    m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        side, i, module, kind = m.groups()
        return f"{side}.blocks.{i}.{_LAYER[module]}.{kind}"
    for hf, oa in _TOP.items():
        if name == hf or name.startswith(hf + "."):
            return oa + name[len(hf):]
    raise KeyError(f"no openai-whisper name for parameter {hf_name}")


def dims(config) -> dict:
    return {"n_mels": config.num_mel_bins, "n_vocab": config.vocab_size,
            "n_audio_ctx": config.max_source_positions, "n_audio_state": config.d_model,
            "n_audio_head": config.encoder_attention_heads, "n_audio_layer": config.encoder_layers,
            "n_text_ctx": config.max_target_positions, "n_text_state": config.d_model,
            "n_text_head": config.decoder_attention_heads, "n_text_layer": config.decoder_layers}


def encode_alignment_heads(heads, n_layers: int, n_heads: int) -> bytes:
    """[[layer, head], ...] in openai's form: a gzipped, base85 boolean (n_text_layer, n_text_head) mask."""
    mask = np.zeros((n_layers, n_heads), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


def tied(model) -> bool:
    import torch
    return torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight)


def export_openai(model, out_dir: Path, half: bool = True, tokenizer=None) -> dict:
    """Write out_dir/model.pt from a WhisperForConditionalGeneration; returns what the marker records."""
    import torch

    if not tied(model):
        raise ValueError("the model's output projection differs from its token embedding; openai-whisper "
                         "ties the two, so this model cannot be exported to it")
    if tokenizer is not None:
        # openai-whisper places the special tokens by the vocabulary size, exactly as whisper.cpp does.
        from whisper_ft.export_ggml import check_vocabulary

        check_vocabulary(tokenizer, model.config.vocab_size)
    state = {}
    for name, tensor in model.state_dict().items():
        new = openai_name(name)
        if new is not None:
            t = tensor.detach().clone()
            state[new] = t.half() if half and t.is_floating_point() else t.float()
    checkpoint = {"dims": dims(model.config), "model_state_dict": state}
    heads = getattr(model.generation_config, "alignment_heads", None)
    if heads:
        checkpoint["alignment_heads"] = encode_alignment_heads(heads, model.config.decoder_layers,
                                                               model.config.decoder_attention_heads)
    torch.save(checkpoint, out_dir / FILENAME)
    return {"file": FILENAME, "dtype": "float16" if half else "float32", "alignment_heads": bool(heads)}


def transcribe_openai(exported: Path, audios: list[np.ndarray], language: str | None, task: str,
                      max_new_tokens: int, suppress_tokens: list[int], suppress_blank: bool) -> list[list[int]]:
    """Greedy token ids of each clip's first 30 s by openai-whisper's own decode loop on the export."""
    import torch
    import whisper

    model = whisper.load_model(str(exported / FILENAME), device="cpu")
    model.float()
    out = []
    for audio in audios:
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), model.dims.n_mels)
        opts = whisper.DecodingOptions(language=language, task=task, temperature=0.0, without_timestamps=True,
                                       fp16=False, sample_len=max_new_tokens, suppress_blank=suppress_blank,
                                       suppress_tokens=",".join(map(str, suppress_tokens)) or None)
        out.append(list(whisper.decode(model, mel, opts).tokens))
    return out
