"""The training run's remaining small parts that train_loop.py calls: console reporting, mixed precision,
optimizer parameter groups, the run state (fresh, resumed and checked against the checkpoint's run), the
best-metric test, the loss/throughput window, and the closing summary. What the loop feeds the model is in
batches.py; why and how a run stops early is in stopping.py."""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from whisper_ft.config import Config
from whisper_ft.data import BadCounter
from whisper_ft.stopping import RunStopped


class Reporter:
    """Prints on the main process only, above the progress bar when one is running."""

    def __init__(self, accelerator):
        self.main = accelerator.is_main_process

    def __call__(self, message: str, to_bar: bool = False) -> None:
        if not self.main:
            return
        from tqdm.auto import tqdm
        tqdm.write(message, file=sys.stderr)  # on a terminal: above the bar, which is redrawn below it
        sys.stderr.flush()


def bar_file():
    """Where the progress bar draws: the terminal, or, in a log file, one whole line per draw.

    tqdm redraws in place with a carriage return and no newline; in train.log the next message would be
    glued onto the bar's line. Every draw is therefore made a line of its own there.
    """
    return sys.stderr if sys.stderr.isatty() else _Lines(sys.stderr)


class _Lines:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip(" ")  # tqdm's in-place redraw and its clearing padding
        if text.strip():
            self.stream.write(text if text.endswith("\n") else text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def mixed_precision(cfg: Config, on_cpu: bool = False) -> str:
    if not (cfg.fp16 or cfg.bf16):
        return "no"
    if on_cpu:  # -g cpu: asked for, so no warning; fp16 autocast on the CPU would only be slower
        return "no"
    if not torch.cuda.is_available():
        warnings.warn(f"{'fp16' if cfg.fp16 else 'bf16'} asked for, but there is no CUDA device: training in fp32",
                      stacklevel=1)
        return "no"
    if cfg.bf16 and not torch.cuda.is_bf16_supported():  # pre-Ampere cards (V100, T4): the shipped config still runs
        warnings.warn("bf16 asked for, but this GPU does not support it: training in fp16", stacklevel=1)
        return "fp16"
    return "fp16" if cfg.fp16 else "bf16"


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and LayerNorm weights (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "layer_norm" in name or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def improves(value: float | None, best: float | None, greater_is_better: bool) -> bool:
    if value is None:
        return False
    return best is None or (value > best if greater_is_better else value < best)


def fresh_state(cfg: Config) -> dict[str, Any]:
    return {"step": 0, "best_metric": None, "best_step": None, "samples_seen": 0, "audio_seconds_seen": 0.0,
            "nonfinite_in_row": 0, "nonfinite_steps": 0, "bad": BadCounter().state_dict(), "base_metrics": None,
            "config": cfg.public_dict(), "mixture_sha256": mixture_digest(cfg.dataset_name)}


def mixture_digest(dataset_name: str) -> str | None:
    """A mixture file's contents: editing it changes what is trained, though dataset_name stays the same."""
    path = Path(dataset_name)
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


# Settings that change what is being trained: resuming across a change would mix two runs.
IDENTITY = ("whisper_pretrained", "lang", "task", "dataset_name", "dataset_config", "train_split",
            "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
            # which weights are trained, and the optimizer's state format: a checkpoint of another mode cannot load
            "freeze_encoder", "lora_r", "lora_alpha", "lora_target_modules", "optim")


def resume_state(saved: dict[str, Any], cfg: Config, say) -> dict[str, Any]:
    before = saved.get("config", {})
    changed = [k for k in IDENTITY if k in before and before[k] != getattr(cfg, k)]
    if saved.get("mixture_sha256") != mixture_digest(cfg.dataset_name):
        changed.append("the sources listed in " + cfg.dataset_name)
    if changed:
        raise RunStopped("the checkpoints in " + cfg.checkpoint_dir + " belong to a different run: " +
                         "; ".join(f"{k} was {before[k]!r}, now {getattr(cfg, k)!r}" if k in IDENTITY else
                                   f"{k} changed" for k in changed) +
                         ". Set a new checkpoint_name (or checkpoint_dir) to start a fresh run.", 2)
    noted = [k for k, v in before.items() if k not in IDENTITY and k in cfg.public_dict() and cfg.public_dict()[k] != v]
    if noted:
        say("resuming with changed settings: " + ", ".join(f"{k} {before[k]!r} -> {getattr(cfg, k)!r}" for k in noted))
    saved["config"] = cfg.public_dict()
    return saved


class Window:
    """Loss and throughput (samples and label tokens of all processes) since the last log line."""

    def __init__(self):
        self.start, self.losses, self.samples, self.tokens = time.perf_counter(), [], 0, 0

    def add(self, loss: float, samples: int, tokens: int = 0) -> None:
        self.losses.append(loss)
        self.samples += samples
        self.tokens += tokens

    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))

    def samples_per_second(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.start)


def set_metrics(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """eval_wer, eval_loss ... of one named evaluation set as eval/<name>/wer, eval/<name>/loss ..."""
    return {f"eval/{name}/{key[5:]}": value for key, value in metrics.items() if key.startswith("eval_")}


def eval_summary(metrics: dict[str, Any], sets: list[str] | None) -> str:
    """One log line: 'wer 12.00, cer 4.00, ...', or per named set 'dev: wer 12.00, ...; general: ...'."""
    shown = ("wer", "cer", "wer_ortho", "loss")
    if not sets:
        return ", ".join(f"{k} {metrics['eval_' + k]:.2f}" for k in shown if "eval_" + k in metrics)
    return "; ".join(f"{name}: " + ", ".join(f"{k} {metrics[f'eval/{name}/{k}']:.2f}" for k in shown
                                             if f"eval/{name}/{k}" in metrics) for name in sets)


def samples_table(rows: list[dict[str, str]]) -> str:
    return "\n".join(f"| {r['id']} | {r['reference']} | {r['prediction']} |" for r in
                     [{"id": "id", "reference": "reference", "prediction": "prediction"},
                      {"id": "-", "reference": "-", "prediction": "-"}] + rows)


def finish(cfg: Config, lang, state: dict[str, Any], bad: BadCounter, out, say) -> str | None:
    """Model card, Hub upload and the closing summary: the before/after numbers a user came for.

    Returns the warning when the exported model is worse than the base model, else None."""
    from whisper_ft import hub

    hub.write_model_card(out, cfg, lang, state)
    base, best = state.get("base_metrics") or {}, state.get("best_metric")
    key = "eval_" + cfg.metric_for_best_model
    if base.get(key) is not None and best is not None:
        say(f"{cfg.metric_for_best_model}: base model {base[key]:.2f} -> fine-tuned {best:.2f}")
    worse = hub.worse_than_base(cfg, base, hub.exported_metrics(cfg, state, hub.read_evals(Path(out))))
    if bad.total:
        say(f"skipped {bad.total} unusable samples during training: "
            + ", ".join(f"{n} {r}" for r, n in bad.counts.most_common()) + "; first: " + "; ".join(bad.examples[:5]))
    say(f"final model: {out} (load with WhisperForConditionalGeneration.from_pretrained)")
    if cfg.push_to_hub:
        url = hub.push(out, cfg)
        say(f"uploaded to {url}")
    if worse:  # last, where a user reading the end of train.log sees it
        say("WARNING: " + worse)
    return worse
