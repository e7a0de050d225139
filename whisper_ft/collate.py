"""Batch padding for Whisper: features stacked, labels padded with -100, start token stripped once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from whisper_ft.data import Bad

IGNORE_INDEX = -100  # positions the loss skips
# Label widths a compiled model sees: each batch is padded up to the next one, so a compiled forward meets at
# most these few shapes instead of one per transcript length (448 is Whisper's decoder length, DESIGN: label length).
# Powers of two: at most 2x the decoder's work, which is small beside the encoder's 1500 frames.
LABEL_BUCKETS = (32, 64, 128, 256, 448)


@dataclass
class Collator:
    decoder_start_token_id: int  # <|startoftranscript|>: the model prepends it when shifting labels right
    bucket: bool = False  # pad label width up to a LABEL_BUCKETS length (for a compiled model); else the longest
    rows: int = 0  # pad the batch to this many rows (for a compiled model); 0 = the samples there are

    def __call__(self, samples: list[dict[str, Any] | Bad]) -> dict[str, Any]:
        good = [s for s in samples if not isinstance(s, Bad)]
        batch: dict[str, Any] = {"bad": [s for s in samples if isinstance(s, Bad)], "ids": [s["id"] for s in good],
                                 "seconds": float(sum(s["seconds"] for s in good)), "tokens": 0}
        if not good:
            return batch
        batch["input_features"] = torch.from_numpy(np.stack([s["input_features"] for s in good]))
        # The tokenizer put <|startoftranscript|> first; the model adds it again when it shifts labels right,
        # so strip it here (DESIGN: decoder start token: the check is on decoder_start_token_id, not bos_token_id).
        labels = [s["labels"][1:] if s["labels"][0] == self.decoder_start_token_id else s["labels"] for s in good]
        batch["tokens"] = sum(len(x) for x in labels)  # what the loss is summed over: counted here, not on the GPU
        width = max(len(x) for x in labels)
        if self.bucket:
            width = next((b for b in LABEL_BUCKETS if b >= width), width)
        # A short batch (an epoch's last, or one with bad samples dropped) would recompile a compiled model
        # (DESIGN: recompiling on batch size): pad it with silent rows whose labels are all -100, which add
        # nothing to the loss or the gradients; counts come from "ids", which holds the real samples only.
        extra = max(0, self.rows - len(good))
        labels += [[]] * extra
        batch["labels"] = torch.tensor([x + [IGNORE_INDEX] * (width - len(x)) for x in labels], dtype=torch.long)
        batch["input_features"] = zero_rows(batch["input_features"], self.rows)
        return batch


def zero_rows(features: torch.Tensor, rows: int) -> torch.Tensor:
    """features with rows of zeros appended up to `rows` (a compiled model's one batch size); as is if not short."""
    short = rows - len(features)
    return torch.cat([features, features.new_zeros(short, *features.shape[1:])]) if short > 0 else features


def decoder_inputs(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """labels -> decoder input ids: <|startoftranscript|> put back first, -100 padding turned into pad tokens.

    The model gets these instead of labels, so it does not compute a mean loss of its own that we would discard.
    """
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    return lambda labels: shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
