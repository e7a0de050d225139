"""What a run on this data will cost: steps per epoch at the config's batch settings, and an estimate of time
and memory per epoch from the speed and memory measured in bench/README.md.

Only a few settings were measured (one card, whisper-small and whisper-large-v3 shapes). Another size is
scaled from the nearest measured size by its training FLOPs per sample (speed.training_flops_per_sample);
its memory is not estimated. Everything here is an estimate and the report says so.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

SOURCE = "bench/README.md, measured on one NVIDIA H200 (an H100-class card)"
# The released checkpoints' shapes: d_model, layers (each side), MLP width, mel bins, vocabulary.
SHAPES = {"tiny": (384, 4, 1536, 80, 51865), "base": (512, 6, 2048, 80, 51865), "small": (768, 12, 3072, 80, 51865),
          "medium": (1024, 24, 4096, 80, 51865), "large": (1280, 32, 5120, 80, 51865),
          "large-v2": (1280, 32, 5120, 80, 51865), "large-v3": (1280, 32, 5120, 128, 51866),
          "large-v3-turbo": (1280, 32, 5120, 128, 51866)}
# (size, mode, precision, batch, gradient checkpointing, samples/s, peak GiB): bench/README.md's measured rows.
MEASURED = [
    ("small", "full", "bf16", 32, "false", 245.3, 22.4),
    ("small", "full", "fp16", 16, "true", 148.6, 5.3),
    ("large-v3", "full", "bf16", 16, "true", 16.6, 26.6),
    ("large-v3", "adamw_8bit", "bf16", 16, "true", 16.4, 17.9),
    ("large-v3", "lora", "bf16", 16, "true", 10.5, 8.7),
    ("large-v3", "frozen encoder", "bf16", 16, "true", 29.9, 16.7),
]
DECODER_TOKENS = 30  # typical label length of a short clip; the encoder's 1500 frames dominate anyway


def size_of(cfg) -> str | None:
    """The Whisper size a config trains: from model_name, else from whisper_pretrained's name."""
    for name in (cfg.whisper_pretrained.rstrip("/").rsplit("/", 1)[-1], cfg.model_name):
        name = name.lower().removeprefix("whisper-").removesuffix(".en")
        if name in SHAPES:
            return name
    return None


def mode_of(cfg) -> str:
    if cfg.lora_r:
        return "lora"
    if cfg.freeze_encoder:
        return "frozen encoder"
    return "adamw_8bit" if cfg.optim == "adamw_8bit" else "full"


def flops(size: str) -> float:
    from whisper_ft.speed import training_flops_per_sample

    d, layers, ffn, mels, vocab = SHAPES[size]
    shape = SimpleNamespace(d_model=d, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, encoder_layers=layers,
                            decoder_layers=layers, num_mel_bins=mels, vocab_size=vocab)
    return training_flops_per_sample(shape, DECODER_TOKENS)


def estimate(cfg, train_samples: int, train_hours: float) -> dict:
    """Steps per epoch and epochs in max_steps (exact), and minutes per epoch and memory (estimates)."""
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    steps = math.ceil(train_samples / per_step) if train_samples else 0
    out = {"train_samples": train_samples, "train_hours": round(train_hours, 3),
           "samples_per_step_per_gpu": per_step, "steps_per_epoch_one_gpu": steps,
           "epochs_in_max_steps": round(cfg.max_steps / steps, 2) if steps else None,
           "model": f"whisper-{size_of(cfg)}" if size_of(cfg) else cfg.model_name, "mode": mode_of(cfg), "precision": precision,
           "batch": cfg.per_device_train_batch_size, "gradient_checkpointing": cfg.gradient_checkpointing,
           "estimate": None}
    size = size_of(cfg)
    if size is None or not train_samples:
        out["note"] = "no estimate: the model size is not one of " + ", ".join(SHAPES) if size is None else \
            "no estimate: no usable training sample"
        return out
    rows = [r for r in MEASURED if r[1] == out["mode"]] or [r for r in MEASURED if r[1] == "full"]

    def closeness(r):  # same size first, then same checkpointing, precision and batch
        return (r[0] != size, r[4] != ("false" if cfg.gradient_checkpointing == "false" else "true"),
                r[2] != precision, abs(r[3] - cfg.per_device_train_batch_size))

    row = min(rows, key=closeness)
    speed = row[5] * flops(row[0]) / flops(size)
    exact = row[0] == size and row[2] == precision and row[3] == cfg.per_device_train_batch_size \
        and row[4] == ("false" if cfg.gradient_checkpointing == "false" else "true")
    out["estimate"] = {
        "basis": f"{row[0]}, {row[1]}, {row[2]}, batch {row[3]}, gradient checkpointing {row[4]}: "
                 f"{row[5]} samples/s, {row[6]} GiB peak ({SOURCE})",
        "same_settings_as_measured": exact,
        "samples_per_second": round(speed, 1),
        "minutes_per_epoch": float(f"{train_samples / speed / 60:.3g}"),
        "minutes_for_max_steps": round(cfg.max_steps * per_step / speed / 60, 1),
        "peak_gib": row[6] if exact else None,  # memory follows batch, precision and checkpointing closely
        "card": "H100-class (H200 measured)",
    }
    return out


def sentence(cost: dict) -> str:
    """'whisper-small, bf16, batch 32: about N minutes per epoch on an H100-class card, fits in X GB (estimate)'."""
    e = cost.get("estimate")
    head = f"{cost['model']}, {cost['mode']}, {cost['precision']}, batch {cost['batch']}"
    if not e:
        return f"{head}: {cost['steps_per_epoch_one_gpu']} steps per epoch on one GPU; {cost.get('note', '')}"
    fits = f", fits in about {e['peak_gib']} GiB" if e["peak_gib"] else ", memory not measured for these settings"
    return (f"{head}: {cost['steps_per_epoch_one_gpu']} optimizer steps per epoch on one GPU, "
            f"{_time(e['minutes_per_epoch'])} per epoch and {_time(e['minutes_for_max_steps'])} for "
            f"max_steps on an H100-class card{fits} (estimate from {SOURCE.split(',')[0]}"
            f"{'' if e['same_settings_as_measured'] else ', scaled from the nearest measured setting'})")


def _time(minutes: float) -> str:
    if minutes < 1 / 60:
        return "under 1 s"
    if minutes < 1:
        return f"about {minutes * 60:.0f} s"
    return f"about {minutes:.0f} minutes" if minutes < 120 else f"about {minutes / 60:.1f} hours"
