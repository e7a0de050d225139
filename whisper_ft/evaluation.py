"""Generation-based evaluation: generate -> gather across processes -> decode -> normalise -> WER/CER."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable

import jiwer
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from whisper_ft.collate import IGNORE_INDEX, decoder_inputs


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and symbols, collapse spaces; keep combining marks.

    Whisper's BasicTextNormalizer removes combining marks, which splits Indic words apart and makes
    WER look better than it is (DESIGN: normaliser strips combining marks). Here only Unicode
    punctuation (P*) and symbols (S*) go, so "মই ভাত খাওঁ।" -> "মই ভাত খাওঁ" and "Don't!" -> "don t".
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def error_rates(references: list[str], predictions: list[str]) -> dict[str, float]:
    """WER and CER after normalisation, and orthographic (raw) WER, in percent.

    References that are empty (after normalisation) are dropped and counted rather than crash jiwer.
    """
    pairs = [(r, p) for r, p in zip(references, predictions) if normalize(r)]
    out = {"eval_samples": len(references), "eval_empty_references": len(references) - len(pairs)}
    if not pairs:
        return out
    refs, preds = [normalize(r) for r, _ in pairs], [normalize(p) for _, p in pairs]
    out["eval_wer"] = 100 * jiwer.wer(refs, preds)
    out["eval_cer"] = 100 * jiwer.cer(refs, preds)
    raw = [(r.strip(), p.strip()) for r, p in pairs if r.strip()]
    out["eval_wer_ortho"] = 100 * jiwer.wer([r for r, _ in raw], [p for _, p in raw])
    return out


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over label tokens: the caller divides by the token count of the whole step."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def evaluate(model, loader, tokenizer, accelerator, *, generate_kwargs: dict[str, Any] | None,
             should_stop: Callable[[], bool] = lambda: False) -> tuple[dict[str, float], list[dict[str, str]], list]:
    """Metrics, per-sample rows (id, reference, prediction) and bad samples, each sample counted once.

    Every process evaluates its own shard (no padding, no duplicates), then rows are gathered and
    deduplicated by sample id, so the count is exact for any number of processes
    (DESIGN: duplicated evaluation samples).
    With generate_kwargs None only the loss is computed.
    """
    from whisper_ft import greedy, sharding

    was_training = model.training
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    shift_right = decoder_inputs(unwrapped.config)
    generate = None if generate_kwargs is None else \
        greedy.Decoding(unwrapped, tokenizer, generate_kwargs, rows=getattr(loader, "batch_size", None) or 0)
    rows, bad, loss_sum, tokens = [], [], 0.0, 0
    batches: Any = loader
    if sharded := sharding.is_sharded(accelerator):  # FSDP, ZeRO-3: every forward needs every process
        placeholder = sharding.placeholder_batch(unwrapped.config, accelerator.device)
        batches = _in_step(loader, accelerator, placeholder)
        if generate_kwargs is not None:  # config validation refuses this combination (sharding.launch_problems)
            raise RuntimeError("generation with FSDP or DeepSpeed ZeRO-3 sharded weights is not supported")
        local_stop = should_stop
        should_stop = lambda: bool(accelerator.reduce(torch.tensor(int(local_stop()), device=accelerator.device), "max"))
    for batch in batches:
        if should_stop():
            break
        bad += batch["bad"]
        if not batch["ids"]:  # all its samples were bad
            if not sharded:
                continue
            batch = placeholder
        features = batch["input_features"].to(accelerator.device, non_blocking=True)
        labels = batch["labels"].to(accelerator.device, non_blocking=True)
        with sharding.fsdp1_root_weights(accelerator, model), accelerator.autocast():
            # with decoding, the encoder once for the loss and the decoding (generation never runs on sharded
            # weights); given encoder_outputs, the forward does not run the encoder on input_features again
            encoded = None if generate is None else unwrapped.get_encoder()(features).last_hidden_state
            logits = unwrapped(input_features=features, encoder_outputs=None if encoded is None else (encoded,),
                               decoder_input_ids=shift_right(labels)).logits
            generated = None if generate is None else generate(features, encoded)
        if not batch["ids"]:  # a placeholder (sharded modes): it only kept this process in step
            continue
        loss_sum += token_loss_sum(logits, labels).item()
        tokens += batch["tokens"]  # the collator's count of label tokens: no read-back from the device
        references = tokenizer.batch_decode(labels.masked_fill(labels == IGNORE_INDEX, tokenizer.eos_token_id),
                                            skip_special_tokens=True)
        predictions = [""] * len(references) if generated is None else \
            tokenizer.batch_decode(generated, skip_special_tokens=True)
        rows += [{"id": i, "reference": r.strip(), "prediction": p.strip()}
                 for i, r, p in zip(batch["ids"], references, predictions)]
    if generate is not None:
        generate.close()
    model.train(was_training)

    gathered = gather_object([(rows, bad, loss_sum, tokens)])
    unique: dict[str, dict[str, str]] = {}
    all_bad, total_loss, total_tokens = [], 0.0, 0
    for part_rows, part_bad, part_loss, part_tokens in gathered:
        for row in part_rows:
            unique.setdefault(row["id"], row)
        all_bad += part_bad
        total_loss += part_loss
        total_tokens += part_tokens
    rows = sorted(unique.values(), key=lambda r: r["id"])
    metrics: dict[str, float] = {"eval_loss": total_loss / max(1, total_tokens)}
    if generate_kwargs is not None:
        metrics.update(error_rates([r["reference"] for r in rows], [r["prediction"] for r in rows]))
    else:
        metrics["eval_samples"] = len(rows)
    # by id, like rows: the order (and so the "first: ..." named in messages) must not depend on the
    # number of processes or on the length order batches are evaluated in
    return metrics, rows, sorted(all_bad, key=lambda b: b.id)


def _in_step(loader, accelerator, placeholder):
    """The loader's batches, then placeholders until the process with the most batches is done."""
    n = torch.tensor(len(loader), device=accelerator.device)
    most = int(accelerator.reduce(n, "max"))
    yield from loader
    for _ in range(most - len(loader)):
        yield placeholder
