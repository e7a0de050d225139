"""With a model: what it hears in each sample, and how unlikely it finds the transcript it is given.

Samples go through the evaluation's own path: batches.eval_loader (length-ordered batches of the loop's
Prepare and Collator), the encoder once per batch for both the loss and the decoding, and greedy.Decoding
(the evaluation's greedy loop, or generate() where that does not apply). Per sample it gives the greedy
transcript, WER and CER of the given transcript against it (normalised as evaluation normalises), and the
mean cross-entropy per label token of the given transcript.
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


@torch.no_grad()
def _batch_scores(model, batch, device, autocast, decode, shift_right, tokenizer) -> list[dict]:
    features = batch["input_features"].to(device)
    labels = batch["labels"].to(device)
    with autocast:
        encoded = model.get_encoder()(features).last_hidden_state
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=shift_right(labels)).logits
        generated = decode(features, encoded)
    n = len(batch["ids"])
    losses = F.cross_entropy(logits[:n].float().transpose(1, 2), labels[:n], ignore_index=IGNORE_INDEX,
                             reduction="none").sum(1) / (labels[:n] != IGNORE_INDEX).sum(1).clamp(min=1)
    references = tokenizer.batch_decode(labels[:n].masked_fill(labels[:n] == IGNORE_INDEX, tokenizer.eos_token_id),
                                        skip_special_tokens=True)
    outputs = tokenizer.batch_decode(generated[:n], skip_special_tokens=True)
    rows = []
    for i, ref, out, loss in zip(batch["ids"], references, outputs, losses.tolist()):
        ref, out = ref.strip(), out.strip()
        r, o = normalize(ref), normalize(out)
        rows.append({"id": i, "reference": ref, "model_output": out, "loss": round(loss, 4),
                     "wer": round(jiwer.wer(r, o), 4) if r else None,
                     "cer": round(jiwer.cer(r, o), 4) if r else None})
    return rows
