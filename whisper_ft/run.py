"""The training run's small parts that train_loop.py calls: data setup, state, stopping, reporting."""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from typing import Any, Callable

import torch

from whisper_ft.config import Config
from whisper_ft.data import Bad, BadCounter, DataError, RecordDataset, load_records


class RunStopped(Exception):
    def __init__(self, message: str, exit_code: int = 3):
        super().__init__(message)
        self.exit_code = exit_code


class Reporter:
    """Prints on the main process only, above the progress bar when one is running."""

    def __init__(self, accelerator):
        self.main = accelerator.is_main_process

    def __call__(self, message: str, to_bar: bool = False) -> None:
        if not self.main:
            return
        if to_bar:
            from tqdm.auto import tqdm
            tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)


def mixed_precision(cfg: Config) -> str:
    if not (cfg.fp16 or cfg.bf16):
        return "no"
    if not torch.cuda.is_available():
        warnings.warn(f"{'fp16' if cfg.fp16 else 'bf16'} asked for, but there is no CUDA device: training in fp32",
                      stacklevel=1)
        return "no"
    return "fp16" if cfg.fp16 else "bf16"


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and LayerNorm weights (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "layer_norm" in name or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_data(cfg: Config, lang, prepare, say) -> tuple[Any, Any, list[Bad]]:
    """Train and eval records, with samples whose transcript is unusable removed up front and returned."""
    common = dict(lang=lang, text_column=cfg.text_column, audio_column=cfg.audio_column,
                  dataset_config=cfg.dataset_config, revision=cfg.dataset_revision, cache_dir=cfg.dataset_cache,
                  token=cfg.hf_token)
    train = load_records(cfg.dataset_name, cfg.train_split, **common)
    evals = load_records(cfg.dataset_name, cfg.eval_split, **common) if cfg.eval_strategy != "no" else []
    train, skipped = _usable(train, prepare)
    if cfg.max_train_samples:
        train = train[: cfg.max_train_samples]
    if not train:
        raise DataError(f"no usable training sample in {cfg.dataset_name} split {cfg.train_split!r}"
                        + (f" ({len(skipped)} skipped: {_reasons(skipped)})" if skipped else ""))
    evals, eval_skipped = _usable(evals, prepare)
    if cfg.max_eval_samples:
        evals = evals[: cfg.max_eval_samples]
    if cfg.eval_strategy != "no" and not evals:
        raise DataError(f"no usable evaluation sample in {cfg.dataset_name} split {cfg.eval_split!r}")
    say(f"data: {len(train)} training samples ({cfg.train_split}), {len(evals)} evaluation samples ({cfg.eval_split})")
    for label, items in (("training", skipped), ("evaluation", eval_skipped)):
        if items:
            say(f"skipped {len(items)} {label} samples before starting: {_reasons(items)}; first: "
                + "; ".join(f"{b.id} ({b.reason})" for b in items[:3]))
    return train, evals, skipped


def _usable(records, prepare) -> tuple[list, list[Bad]]:
    """Drop empty and over-long transcripts by text alone, before any audio is decoded (pitfall 1)."""
    keep, bad = [], []
    for record in records:
        labels = prepare.labels(record.text)
        if isinstance(labels, Bad):
            bad.append(Bad(record.id, labels.reason, labels.detail))
        else:
            keep.append(record)
    return keep, bad


def _reasons(items: list[Bad]) -> str:
    from collections import Counter
    return ", ".join(f"{n} {reason}" for reason, n in Counter(b.reason for b in items).most_common())


def eval_loader(records, prepare, collate, cfg: Config, rank: int, world: int):
    """This process's share of the eval set: every sample on exactly one process, none padded in."""
    mine = list(range(rank, len(records), world))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(RecordDataset(records, prepare), mine),
                                       batch_size=cfg.per_device_eval_batch_size, collate_fn=collate,
                                       num_workers=cfg.dataloader_num_workers, shuffle=False)


def batch_or_placeholder(batch, model, device):
    """A micro-batch whose samples were all bad still runs a zero-loss step, so processes stay in step."""
    if batch["ids"]:
        return batch["input_features"].to(device), batch["labels"].to(device)
    config = model.module.config if hasattr(model, "module") else model.config
    features = torch.zeros(1, config.num_mel_bins, 2 * config.max_source_positions, device=device)
    return features, torch.full((1, 1), -100, dtype=torch.long, device=device)


def decoder_inputs(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """labels -> decoder input ids: <|startoftranscript|> first, -100 padding turned into pad tokens."""
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    return lambda labels: shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)


def injected_nan_steps() -> set[int]:
    """Optimizer steps (1-based) whose loss is made NaN: a fault-injection hook for the tests."""
    return {int(s) for s in os.environ.get("WHISPER_FT_INJECT_NAN", "").split(",") if s.strip()}


def fresh_state(cfg: Config) -> dict[str, Any]:
    return {"step": 0, "best_metric": None, "best_step": None, "samples_seen": 0, "audio_seconds_seen": 0.0,
            "nonfinite_in_row": 0, "nonfinite_steps": 0, "bad": BadCounter().state_dict(), "base_metrics": None,
            "config": cfg.public_dict()}


# Settings that change what is being trained: resuming across a change would mix two runs.
IDENTITY = ("whisper_pretrained", "lang", "task", "dataset_name", "dataset_config", "train_split",
            "per_device_train_batch_size", "gradient_accumulation_steps", "seed")


def resume_state(saved: dict[str, Any], cfg: Config, say) -> dict[str, Any]:
    before = saved.get("config", {})
    changed = [k for k in IDENTITY if k in before and before[k] != getattr(cfg, k)]
    if changed:
        raise RunStopped("the checkpoints in " + cfg.checkpoint_dir + " belong to a different run: " +
                         "; ".join(f"{k} was {before[k]!r}, now {getattr(cfg, k)!r}" for k in changed) +
                         ". Set a new checkpoint_name (or checkpoint_dir) to start a fresh run.", 2)
    noted = [k for k, v in before.items() if k not in IDENTITY and k in cfg.public_dict() and cfg.public_dict()[k] != v]
    if noted:
        say("resuming with changed settings: " + ", ".join(f"{k} {before[k]!r} -> {getattr(cfg, k)!r}" for k in noted))
    saved["config"] = cfg.public_dict()
    return saved


class Window:
    """Loss and throughput since the last log line."""

    def __init__(self):
        self.start, self.losses, self.samples = time.perf_counter(), [], 0

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))

    def samples_per_second(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.start)


def check_bad_fraction(bad: BadCounter, cfg: Config, say, on_stop: Callable[[], None]) -> None:
    """Stop, after saving, when too many samples are unusable: the corpus itself needs fixing."""
    if bad.seen < 20 or bad.total / bad.seen <= cfg.max_bad_sample_fraction:
        return
    reason, n = bad.counts.most_common(1)[0]
    on_stop()
    raise RunStopped(f"{bad.total} of {bad.seen} samples seen ({100 * bad.total / bad.seen:.0f}%) were unusable, "
                     f"over max_bad_sample_fraction {cfg.max_bad_sample_fraction}; commonest reason: {reason} ({n}). "
                     f"First ones: {'; '.join(bad.examples[:5])}. A checkpoint was saved.", 1)


class GracefulStop:
    """SIGTERM/SIGINT -> save at the next optimizer step and exit; a second signal exits at once."""

    def __init__(self, accelerator):
        self.accelerator, self.flag, self.on_stop = accelerator, False, lambda: None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.flag:
            raise SystemExit(128 + signum)
        self.flag = True
        print(f"\nwhisper-ft: got {signal.Signals(signum).name}; saving a checkpoint at the next step "
              "(signal again to exit at once)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return self.flag

    def agreed(self) -> bool:
        """True on every process when any process was signalled."""
        flag = torch.tensor(int(self.flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max"))

    def check(self, step: int) -> None:
        if self.agreed():
            self.on_stop()
            raise RunStopped(f"stopped by signal at step {step}; checkpoint saved. Rerun the same command to resume.")


def samples_table(rows: list[dict[str, str]]) -> str:
    return "\n".join(f"| {r['id']} | {r['reference']} | {r['prediction']} |" for r in
                     [{"id": "id", "reference": "reference", "prediction": "prediction"},
                      {"id": "-", "reference": "-", "prediction": "-"}] + rows)


def finish(cfg: Config, lang, state: dict[str, Any], bad: BadCounter, out, say) -> None:
    """Model card, Hub upload and the closing summary: the before/after numbers a user came for."""
    from whisper_ft import hub

    hub.write_model_card(out, cfg, lang, state)
    base, best = state.get("base_metrics") or {}, state.get("best_metric")
    key = "eval_" + cfg.metric_for_best_model
    if base.get(key) is not None and best is not None:
        say(f"{cfg.metric_for_best_model}: base model {base[key]:.2f} -> fine-tuned {best:.2f}")
    if bad.total:
        say(f"skipped {bad.total} unusable samples during training: "
            + ", ".join(f"{n} {r}" for r, n in bad.counts.most_common()))
    say(f"final model: {out} (load with WhisperForConditionalGeneration.from_pretrained)")
    if cfg.push_to_hub:
        url = hub.push(out, cfg)
        say(f"uploaded to {url}")
