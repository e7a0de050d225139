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
from whisper_ft.data import Bad, BadCounter, DataError, RecordDataset
from whisper_ft.sources import load_records


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


def load_data(cfg: Config, lang, prepare, say) -> tuple[Any, list]:
    """Train and eval records, checked before training starts.

    Training records with an unreadable table line, an unusable transcript or a known duration over
    30 s stay in the training set: the loop counts them as bad when it draws them, so the bad share is
    measured over the samples seen (counting them here as well would inflate it early in the run). They
    are counted and named here; if they alone are more than max_bad_sample_fraction, or no sample is
    usable, or none of the audio files exists, this is an error before training. Unusable evaluation
    records are removed. A mixture (dataset_name a list, or a .yaml file listing sources) is joined
    here, each source with its own splits, columns and weight. Returns (train, eval): train is a
    list, or a HubStream when streaming a Hub dataset; eval is a list (a streamed eval split is read).
    """
    from collections import Counter
    from itertools import islice
    from pathlib import Path

    from whisper_ft.sources import mix, read_mixture

    sources = read_mixture(cfg.dataset_name) or [{"name": cfg.dataset_name, "label": ""}]
    if cfg.streaming and len(sources) > 1:
        raise DataError("streaming: true works with one Hub dataset, not with a mixture; turn streaming off")
    train_parts, eval_parts = [], []
    for source in sources:
        common = dict(lang=lang, text_column=source.get("text_column") or cfg.text_column,
                      audio_column=source.get("audio_column") or cfg.audio_column,
                      dataset_config=source.get("dataset_config") or cfg.dataset_config,
                      revision=source.get("dataset_revision") or cfg.dataset_revision, cache_dir=cfg.dataset_cache,
                      token=cfg.hf_token, streaming=cfg.streaming)
        train_split = source.get("train_split") or cfg.train_split
        train_parts.append((source["label"], load_records(source["name"], train_split, **common)))
        eval_split = cfg.eval_split if source.get("eval_split") is None else source["eval_split"]
        if cfg.eval_strategy != "no" and eval_split:
            evals = load_records(source["name"], eval_split, **common)
            if not isinstance(evals, list):  # streamed: read it (up to max_eval_samples) so it can be sharded
                evals = list(islice(evals, cfg.max_eval_samples or None))
            eval_parts.append((source["label"], evals))
    if len(sources) == 1:
        train, evals = train_parts[0][1], (eval_parts[0][1] if eval_parts else [])
    else:
        train, counts = mix(train_parts, [s.get("weight") for s in sources], cfg.seed)
        say("mixture, samples per epoch: " + ", ".join(
            f"{label} {c} ({len(records)} records{', weight ' + str(s['weight']) if s.get('weight') is not None else ''})"
            for (label, records), c, s in zip(train_parts, counts, sources)))
        evals = mix(eval_parts, [None] * len(eval_parts), cfg.seed)[0]
    where = f"{cfg.dataset_name} split {cfg.train_split!r}" if len(sources) == 1 else "the mixture"

    bad = []
    if isinstance(train, list):
        if cfg.max_train_samples:
            train = train[: cfg.max_train_samples]
        bad = _usable(train, prepare)[1]
        if len(bad) == len(train):
            raise DataError(f"no usable training sample in {where}" + (f" ({len(bad)} unusable: {_reasons(bad)}; "
                            "first: " + "; ".join(f"{b.id} ({b.reason})" for b in bad[:3]) + ")" if bad else ""))
        if len(train) >= 20 and len(bad) / len(train) > cfg.max_bad_sample_fraction:
            reason, n = Counter(b.reason for b in bad).most_common(1)[0]
            raise DataError(f"{len(bad)} of {len(train)} training samples in {where} are unusable "
                            f"({100 * len(bad) / len(train):.0f}%, over max_bad_sample_fraction "
                            f"{cfg.max_bad_sample_fraction}); commonest reason: {reason} ({n}); first: "
                            + "; ".join(f"{b.id} ({b.reason}{', ' + b.detail if b.detail else ''})" for b in bad[:5]))
        files = [r.path for r in train[:2000] if r.path and r.audio_bytes is None and r.fetch is None]
        if files and not any(Path(f).is_file() for f in files):
            raise DataError(f"none of the {len(files)} audio files checked in {where} exists (first: {files[0]}); "
                            "paths in a manifest are relative to the manifest's folder")
    elif cfg.max_train_samples:
        train.ds = train.ds.take(cfg.max_train_samples)

    keep, eval_bad = _usable(evals, prepare)
    evals = [evals[i] for i in keep][: cfg.max_eval_samples or None]
    if cfg.eval_strategy != "no" and not evals:
        raise DataError(f"no usable evaluation sample in {cfg.dataset_name} split {cfg.eval_split!r}"
                        + (f" ({len(eval_bad)} unusable: {_reasons(eval_bad)})" if eval_bad else ""))
    size = len(train) if isinstance(train, list) else "streamed"
    say(f"data: {size} training samples ({cfg.train_split}), {len(evals)} evaluation samples ({cfg.eval_split})")
    if bad:
        say(f"{len(bad)} training samples are unusable and will be skipped and counted when drawn: {_reasons(bad)}; "
            "first: " + "; ".join(f"{b.id} ({b.reason})" for b in bad[:3]))
    if eval_bad:
        say(f"skipped {len(eval_bad)} evaluation samples before starting: {_reasons(eval_bad)}; first: "
            + "; ".join(f"{b.id} ({b.reason})" for b in eval_bad[:3]))
    train_ids = {r.id for r in train} if isinstance(train, list) else set()
    if evals and all(r.id in train_ids for r in evals):
        say(f"warning: all {len(evals)} evaluation samples are training samples too (a manifest without a "
            "split column gives every split all its rows): the evaluation measures memorisation, not accuracy")
    return train, evals


def _usable(records, prepare) -> tuple[list[int], list[Bad]]:
    """Positions of the records usable as far as can be told without audio, and a Bad for each other one."""
    keep, bad = [], []
    for i, record in enumerate(records):
        problem = prepare.screen(record)
        if problem is None:
            keep.append(i)
        else:
            bad.append(problem)
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


class StreamBatches:
    """Collated batches from a streamed dataset, endless over epochs, with an exact position.

    The stream is read in this process (no workers), so after each batch its state_dict() is exactly
    the position to resume from: no replay, no skipped rows. This process's rows are its own shard.
    """

    def __init__(self, stream, prepare, collate, batch_size: int, rank: int, world: int):
        self.stream = stream.shard(rank, world)
        self.prepare, self.collate, self.batch_size = prepare, collate, batch_size
        self.epoch, self._it, self._rows_this_epoch = 0, None, 0

    def __iter__(self):
        return self

    def __next__(self):
        samples = []
        while len(samples) < self.batch_size:
            if self._it is None:
                self.stream.ds.set_epoch(self.epoch)
                self._it = iter(self.stream)
            try:
                samples.append(self.prepare(next(self._it)))
                self._rows_this_epoch += 1
            except StopIteration:
                if not self._rows_this_epoch:
                    raise DataError("the streamed training split has no rows for this process") from None
                self.epoch, self._it, self._rows_this_epoch = self.epoch + 1, None, 0
        return self.collate(samples)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stream": self.stream.state_dict() if self._it is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        if state["stream"] is not None:
            self.stream.ds.set_epoch(self.epoch)
            self.stream.load_state_dict(state["stream"])
            self._it = iter(self.stream)


def train_batches(records, prepare, collate, cfg: Config, rank: int, world: int, start_step: int):
    """Endless training batches for this process, starting `start_step` optimizer steps in."""
    from whisper_ft.data import TrainBatches

    if not isinstance(records, list):  # a streamed Hub dataset: its position comes from the checkpoint
        return StreamBatches(records, prepare, collate, cfg.per_device_train_batch_size, rank, world)
    return iter(torch.utils.data.DataLoader(
        RecordDataset(records, prepare), collate_fn=collate, num_workers=cfg.dataloader_num_workers,
        batch_sampler=TrainBatches(len(records), cfg.per_device_train_batch_size, cfg.seed, rank, world,
                                   start=start_step * cfg.gradient_accumulation_steps),
        generator=torch.Generator(),  # its own RNG: creating the loader must not shift dropout's (exact resume)
        persistent_workers=cfg.dataloader_num_workers > 0))


def step_totals(micro: list[dict[str, Any]], accelerator) -> tuple[int, int, float, int, int]:
    """(label tokens, samples, audio seconds, bad samples, samples drawn) of one optimizer step, all processes."""
    local = [sum(int((mb["labels"] != -100).sum()) for mb in micro if mb["ids"]),
             sum(len(mb["ids"]) for mb in micro), sum(mb["seconds"] for mb in micro),
             sum(len(mb["bad"]) for mb in micro), sum(len(mb["ids"]) + len(mb["bad"]) for mb in micro)]
    tokens, samples, seconds, bad, seen = accelerator.reduce(
        torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return int(tokens), int(samples), seconds, int(bad), int(seen)


def gather_bad(micro: list[dict[str, Any]]) -> list[Bad]:
    from accelerate.utils import gather_object

    return [b for part in gather_object([[b for mb in micro for b in mb["bad"]]]) for b in part]


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


def improves(value: float | None, best: float | None, greater_is_better: bool) -> bool:
    if value is None:
        return False
    return best is None or (value > best if greater_is_better else value < best)


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
            + ", ".join(f"{n} {r}" for r, n in bad.counts.most_common()) + "; first: " + "; ".join(bad.examples[:5]))
    say(f"final model: {out} (load with WhisperForConditionalGeneration.from_pretrained)")
    if cfg.push_to_hub:
        url = hub.push(out, cfg)
        say(f"uploaded to {url}")
