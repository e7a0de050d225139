"""With a model: what it hears in each sample, and how unlikely it finds the transcript it is given.

Samples go through the evaluation's own path: batches.eval_loader (length-ordered batches of the loop's
Prepare and Collator), the encoder once per batch for both the loss and the decoding, and greedy.Decoding
(the evaluation's greedy loop, or generate() where that does not apply). Per sample it gives the greedy
transcript, WER and CER of the given transcript against it (normalised as evaluation normalises), and the
mean cross-entropy per token of the given transcript, and how much higher that is than the model's loss on
its own transcript (the margin).
"""

from __future__ import annotations

import sys
import time

import jiwer
import torch
import torch.nn.functional as F

from whisper_ft.collate import IGNORE_INDEX, Collator, decoder_inputs
from whisper_ft.evaluation import error_rates, normalize


def score(model, processor, splits: dict[str, list], cfg, say=None) -> tuple[dict, dict]:
    """({(split, id): {"model_output", "wer", "cer", "loss"}}, {split: the model's WER/CER on its usable samples})."""
    from whisper_ft import batches, greedy
    from whisper_ft.data import Prepare
    from whisper_ft.model import generate_kwargs

    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16 if cfg.bf16 else torch.float16) \
        if device.type == "cuda" and (cfg.bf16 or cfg.fp16) else torch.autocast("cpu", enabled=False)
    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    tokenizer = processor.tokenizer
    decode = greedy.Decoding(model, tokenizer, generate_kwargs(model, cfg.generation_max_length))
    shift_right = decoder_inputs(model.config)
    total = sum(len(r) for r in splits.values())
    scores, per_split, done, start, shown = {}, {}, 0, time.perf_counter(), 0.0
    for split, records in splits.items():
        rows = []
        loader = batches.eval_loader(records, prepare, Collator(model.config.decoder_start_token_id), cfg, 0, 1)
        for batch in loader:
            done += len(batch["ids"]) + len(batch["bad"])
            if batch["ids"]:
                rows += _batch_scores(model, batch, device, autocast, decode, shift_right, tokenizer)
            now = time.perf_counter()
            if now - shown > 10 or done == total:  # progress and an ETA, at most every 10 s
                shown = now
                rate = done / (now - start)
                say(f"model pass: {done}/{total} samples, {rate:.1f} samples/s, "
                    f"about {(total - done) / rate:.0f} s left")
        for row in rows:
            scores[(split, row.pop("id"))] = row
        if rows:
            per_split[split] = {k[5:]: round(v, 2) for k, v in
                                error_rates([r["reference"] for r in rows], [r["model_output"] for r in rows]).items()
                                if k in ("eval_wer", "eval_cer", "eval_samples")}
    decode.close()
    return scores, per_split


def _text_loss(model, encoded, labels, shift_right, prefix: int) -> torch.Tensor:
    """Mean cross-entropy per transcript token of each row: the prefix (language, task, no-timestamps) is the
    same for every sample and would only dilute the difference between them."""
    logits = model(encoder_outputs=(encoded,), decoder_input_ids=shift_right(labels)).logits
    labels = labels.clone()
    labels[:, :prefix] = IGNORE_INDEX
    return F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                           reduction="none").sum(1) / (labels != IGNORE_INDEX).sum(1).clamp(min=1)


def _as_labels(generated: torch.Tensor, eos: int) -> torch.Tensor:
    """Greedy output (start token, prefix, text, EOS, EOS...) -> labels as the collator makes them: the start
    token dropped, everything after the first EOS ignored."""
    labels = generated[:, 1:].clone()
    ended = (labels == eos).cumsum(1)
    labels[(ended > 1) | ((ended == 1) & (labels != eos))] = IGNORE_INDEX
    return labels


@torch.no_grad()
def _batch_scores(model, batch, device, autocast, decode, shift_right, tokenizer) -> list[dict]:
    """Per sample: the model's transcript, WER/CER of the given one against it, the loss per token of the given
    transcript, and the margin: that loss minus the loss of the model's own transcript. A clip the model cannot
    read well is unlikely under any transcript (a small margin); a mislabelled clip that it reads well has a
    likely transcript of its own and an unlikely given one (a large margin)."""
    n = len(batch["ids"])
    features = batch["input_features"][:n].to(device)
    labels = batch["labels"][:n].to(device)
    prefix = len(tokenizer.prefix_tokens) - 1  # the labels start after <|startoftranscript|>
    with autocast:
        encoded = model.get_encoder()(features).last_hidden_state
        generated = decode(features, encoded)
        losses = _text_loss(model, encoded, labels, shift_right, prefix)
        own = _text_loss(model, encoded, _as_labels(generated, tokenizer.eos_token_id), shift_right, prefix)
    references = tokenizer.batch_decode(labels.masked_fill(labels == IGNORE_INDEX, tokenizer.eos_token_id),
                                        skip_special_tokens=True)
    outputs = tokenizer.batch_decode(generated, skip_special_tokens=True)
    rows = []
    for i, ref, out, loss, own_loss in zip(batch["ids"], references, outputs, losses.tolist(), own.tolist()):
        ref, out = ref.strip(), out.strip()
        r, o = normalize(ref), normalize(out)
        rows.append({"id": i, "reference": ref, "model_output": out, "loss": round(loss, 4),
                     "margin": round(loss - own_loss, 4),
                     "wer": round(jiwer.wer(r, o), 4) if r else None,
                     "cer": round(jiwer.cer(r, o), 4) if r else None})
    return rows
