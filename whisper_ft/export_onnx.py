"""A transformers Whisper as the ONNX files sherpa-onnx's Whisper recognizer loads: encoder.onnx,
decoder.onnx (and their int8 variants) and tokens.txt, in the layout of sherpa-onnx's
scripts/whisper/export-onnx.py.

The graphs are traced from openai-whisper's modules (the weights converted as for --format openai), as
sherpa-onnx's own script does: the encoder returns every decoder layer's cross-attention keys and values,
the decoder takes tokens, the self-attention caches, those keys and values and an offset. The metadata
(special-token ids, language tokens, non-speech tokens) comes from the model's own tokenizer and
generation config, not openai's vocabulary, and tokens.txt lists the model's own BPE tokens (base64 of their
bytes, then the id, as sherpa-onnx reads them), so a fine-tune's tokenizer is what sherpa-onnx decodes with.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from whisper_ft.export_ggml import check_vocabulary, text_tokens
from whisper_ft.export_openai import dims, openai_name

ENCODER, DECODER, TOKENS = "encoder.onnx", "decoder.onnx", "tokens.txt"
ENCODER_INT8, DECODER_INT8 = "encoder.int8.onnx", "decoder.int8.onnx"
OPSET = 17


def openai_model(model):
    """The openai-whisper module holding the transformers model's weights (float32)."""
    import whisper

    oa = whisper.model.Whisper(whisper.model.ModelDimensions(**dims(model.config)))
    state = {openai_name(k): v.float() for k, v in model.state_dict().items() if openai_name(k) is not None}
    oa.load_state_dict(state)
    return oa.eval()


def whisper_window(mel, n_frames: int):
    """The encoder's input as Whisper's 30-s window, whatever frames sherpa-onnx passes.

    sherpa-onnx hands the encoder the clip's log-mel frames followed by frames of zeros (its tail padding,
    1000 by default), fewer than the window's 3000. Whisper was trained on, and transformers, openai-whisper
    and whisper.cpp transcribe with, the clip padded with silence to 30 s, whose frames hold the clip's
    largest normalised log-mel value minus 2 (silence is clamped at the maximum minus 8, then scaled by 1/4).
    The shorter, zero-filled input changes transcripts (measured on a real fine-tuned tiny.en in
    docs/deploy.md), so the graph turns it back into the window: all-zero frames (which the
    log-mel of real audio never produces unless that is also the silence value) and the missing frames up
    to n_frames become the silence value. A full window, as transformers' features are, passes unchanged.
    """
    import torch

    silent = (mel == 0).all(dim=1, keepdim=True)  # (batch, 1, frames)
    top = torch.where(silent, torch.full_like(mel, float("-inf")), mel).amax(dim=(1, 2), keepdim=True)
    # Only zero frames (no audio at all): Whisper's value for digital silence, (log10(1e-10) + 4) / 4.
    fill = torch.where(torch.isinf(top), torch.full_like(top, -1.5), top - 2.0)
    mel = torch.where(silent, fill, mel)
    return torch.cat([mel, fill.expand(-1, mel.shape[1], n_frames)], dim=2)[:, :, :n_frames]


def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self, oa):
            super().__init__()
            self.encoder, self.decoder = oa.encoder, oa.decoder

        def forward(self, mel):
            enc = self.encoder
            mel = whisper_window(mel, 2 * enc.positional_embedding.shape[0])
            x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).permute(0, 2, 1)
            x = (x + enc.positional_embedding[: x.shape[1]]).to(x.dtype)
            for block in enc.blocks:
                x = block(x)
            x = enc.ln_post(x)
            keys = [b.cross_attn.key(x) for b in self.decoder.blocks]
            values = [b.cross_attn.value(x) for b in self.decoder.blocks]
            return torch.stack(keys), torch.stack(values)

    class Decoder(nn.Module):
        def __init__(self, oa):
            super().__init__()
            self.decoder = oa.decoder

        def forward(self, tokens, self_k, self_v, cross_k, cross_v, offset):
            dec = self.decoder
            n = tokens.shape[-1]
            x = dec.token_embedding(tokens) + dec.positional_embedding[offset[0]: offset[0] + n]
            x = x.to(cross_k[0].dtype)
            for i, block in enumerate(dec.blocks):
                k_cache = self_k[i, :, : offset[0] + n, :]
                v_cache = self_v[i, :, : offset[0] + n, :]
                h = block.attn_ln(x)
                att = block.attn
                q, k, v = att.query(h), att.key(h), att.value(h)
                k_cache[:, -k.shape[1]:, :] = k
                v_cache[:, -v.shape[1]:, :] = v
                wv, _ = att.qkv_attention(q, k_cache, v_cache, dec.mask)
                x = x + att.out(wv)
                h = block.cross_attn_ln(x)
                wv, _ = block.cross_attn.qkv_attention(block.cross_attn.query(h), cross_k[i], cross_v[i], None)
                x = x + block.cross_attn.out(wv)
                x = x + block.mlp(block.mlp_ln(x))
                self_k[i, :, : offset[0] + n, :] = k_cache
                self_v[i, :, : offset[0] + n, :] = v_cache
            x = dec.ln(x)
            logits = torch.matmul(dec.token_embedding.weight.to(x.dtype), x.permute(0, 2, 1)).permute(0, 2, 1)
            return logits.float(), self_k, self_v

    return Encoder, Decoder


def metadata(model, tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    gen = model.generation_config
    # In id order, as openai's tokenizer lists them (generation configs store them sorted by name).
    lang_to_id = dict(sorted((getattr(gen, "lang_to_id", None) or {}).items(), key=lambda kv: kv[1]))
    multilingual = bool(lang_to_id)
    sot = vocab["<|startoftranscript|>"]
    sot_sequence = [sot] + ([lang_to_id.get("<|en|>", min(lang_to_id.values())), vocab["<|transcribe|>"]]
                            if multilingual else [])
    space = tokenizer.convert_tokens_to_ids("Ġ")
    d = dims(model.config)
    return {
        "model_type": "whisper-ft", "version": "1", "maintainer": "whisper-ft", **d,
        "sot_sequence": ",".join(map(str, sot_sequence)),
        "all_language_tokens": ",".join(map(str, lang_to_id.values())),
        "all_language_codes": ",".join(t[2:-2] for t in lang_to_id),
        "sot": sot, "sot_index": 0, "eot": vocab["<|endoftext|>"],
        "blank_id": space if isinstance(space, int) and space != tokenizer.unk_token_id else vocab["<|endoftext|>"],
        "is_multilingual": int(multilingual),
        "no_speech": vocab.get("<|nospeech|>", vocab.get("<|nocaptions|>", -1)),
        "non_speech_tokens": ",".join(map(str, gen.suppress_tokens or [])),
        "transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"],
        "sot_prev": vocab["<|startofprev|>"], "sot_lm": vocab["<|startoflm|>"],
        "no_timestamps": vocab["<|notimestamps|>"],
    }


def _add_metadata(path: Path, meta: dict) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for key, value in meta.items():
        prop = m.metadata_props.add()
        prop.key, prop.value = key, str(value)
    onnx.save(m, str(path))


def export_onnx(model, processor, out_dir: Path, int8: bool = True) -> dict:
    """Write encoder.onnx, decoder.onnx, tokens.txt (and the int8 pair) into out_dir."""
    import torch
    from whisper.model import disable_sdpa

    check_vocabulary(processor.tokenizer, model.config.vocab_size)  # sherpa-onnx's decoding assumes it too
    oa = openai_model(model)
    Encoder, Decoder = _modules()
    n_mels, n_layers = model.config.num_mel_bins, model.config.decoder_layers
    n_ctx, n_state = model.config.max_target_positions, model.config.d_model
    mel = torch.zeros(1, n_mels, 3000)
    with torch.no_grad(), disable_sdpa():
        encoder = Encoder(oa)
        cross_k, cross_v = encoder(mel)
        torch.onnx.export(encoder, (mel,), str(out_dir / ENCODER), opset_version=OPSET, dynamo=False,
                          input_names=["mel"], output_names=["n_layer_cross_k", "n_layer_cross_v"],
                          dynamic_axes={"mel": {0: "n_audio", 2: "T"}, "n_layer_cross_k": {1: "n_audio", 2: "T"},
                                        "n_layer_cross_v": {1: "n_audio", 2: "T"}})
        tokens = torch.tensor([[1]], dtype=torch.int64)
        self_k = torch.zeros(n_layers, 1, n_ctx, n_state)
        self_v = torch.zeros(n_layers, 1, n_ctx, n_state)
        offset = torch.tensor([3], dtype=torch.int64)
        torch.onnx.export(Decoder(oa), (tokens, self_k, self_v, cross_k, cross_v, offset), str(out_dir / DECODER),
                          opset_version=OPSET, dynamo=False,
                          input_names=["tokens", "in_n_layer_self_k_cache", "in_n_layer_self_v_cache",
                                       "n_layer_cross_k", "n_layer_cross_v", "offset"],
                          output_names=["logits", "out_n_layer_self_k_cache", "out_n_layer_self_v_cache"],
                          dynamic_axes={"tokens": {0: "n_audio", 1: "n_tokens"},
                                        "in_n_layer_self_k_cache": {1: "n_audio"},
                                        "in_n_layer_self_v_cache": {1: "n_audio"},
                                        "n_layer_cross_k": {1: "n_audio", 2: "T"},
                                        "n_layer_cross_v": {1: "n_audio", 2: "T"}})
    _add_metadata(out_dir / ENCODER, metadata(model, processor.tokenizer))
    with open(out_dir / TOKENS, "w", encoding="utf-8") as f:
        for i, t in enumerate(text_tokens(processor.tokenizer)):
            f.write(f"{base64.b64encode(t).decode() or '='} {i}\n")
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for src, dst in ((ENCODER, ENCODER_INT8), (DECODER, DECODER_INT8)):
            quantize_dynamic(model_input=str(out_dir / src), model_output=str(out_dir / dst),
                             op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    return {"files": [ENCODER, DECODER, TOKENS] + ([ENCODER_INT8, DECODER_INT8] if int8 else [])}


def transcribe_onnx(exported: Path, audios: list[np.ndarray], language: str | None, int8: bool = False,
                    threads: int = 1) -> list[str]:
    """Greedy text of each clip by sherpa-onnx's Whisper recognizer on the export."""
    import sherpa_onnx

    enc, dec = (ENCODER_INT8, DECODER_INT8) if int8 else (ENCODER, DECODER)
    rec = sherpa_onnx.OfflineRecognizer.from_whisper(
        encoder=str(exported / enc), decoder=str(exported / dec), tokens=str(exported / TOKENS),
        language=language or "", task="transcribe", num_threads=threads, decoding_method="greedy_search")
    out = []
    for audio in audios:
        stream = rec.create_stream()
        stream.accept_waveform(16_000, audio[:30 * 16_000].astype(np.float32))
        rec.decode_stream(stream)
        out.append(stream.result.text.strip())
    return out


def greedy_onnxruntime(exported: Path, features: np.ndarray, prompt: list[int], eot: int, max_new_tokens: int,
                       suppress: list[int], begin_suppress: list[int], int8: bool = False) -> list[list[int]]:
    """The exported graphs run by onnxruntime on transformers' own features, greedy with the generation
    config's suppression: a check of the graphs and weights alone, apart from sherpa-onnx's feature padding."""
    import onnxruntime as ort

    enc, dec = (ENCODER_INT8, DECODER_INT8) if int8 else (ENCODER, DECODER)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    encoder = ort.InferenceSession(str(exported / enc), opts, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(exported / dec), opts, providers=["CPUExecutionProvider"])
    meta = encoder.get_modelmeta().custom_metadata_map
    n_layers, n_ctx, n_state = int(meta["n_text_layer"]), int(meta["n_text_ctx"]), int(meta["n_text_state"])
    out = []
    for f in features:
        cross_k, cross_v = encoder.run(None, {"mel": f[None].astype(np.float32)})
        self_k = np.zeros((n_layers, 1, n_ctx, n_state), np.float32)
        self_v = np.zeros_like(self_k)
        tokens, offset, ids = np.array([prompt], np.int64), 0, []
        while len(ids) < max_new_tokens:
            logits, self_k, self_v = decoder.run(None, {
                "tokens": tokens, "in_n_layer_self_k_cache": self_k, "in_n_layer_self_v_cache": self_v,
                "n_layer_cross_k": cross_k, "n_layer_cross_v": cross_v, "offset": np.array([offset], np.int64)})
            last = logits[0, -1].copy()
            last[list(suppress)] = -np.inf
            if not ids:
                last[list(begin_suppress)] = -np.inf
            offset += tokens.shape[1]
            nxt = int(last.argmax())
            if nxt == eot:
                break
            ids.append(nxt)
            tokens = np.array([[nxt]], np.int64)
        out.append(ids)
    return out
