"""What the training loop feeds the model: the checked train and eval records, the training stream drawn
from them (MapBatches: a DataLoader over a record list; StreamBatches: an exact-position reader over a
streamed Hub dataset; both with one interface), the per-step totals and bad samples gathered across
processes, and the tensors a micro-batch becomes. The whole path from the data source to the forward
pass reads here, apart from the run's state (state.py) and stopping logic (stopping.py); the evaluate
command uses its eval_loader too."""

from __future__ import annotations

import os
from typing import Any

import torch

from whisper_ft.collate import IGNORE_INDEX
from whisper_ft.config import Config
from whisper_ft.data import Bad, DataError, RecordDataset, describe, name_first, reasons
from whisper_ft.sources import load_records


FEW_SAMPLES = 8  # fewer training samples than this is a mistake more often than a plan


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
    from whisper_ft.sources import mix, read_mixture

    sources = read_mixture(cfg.dataset_name) or [{"name": cfg.dataset_name, "label": ""}]
    if cfg.streaming and len(sources) > 1:
        raise DataError("streaming: true works with one Hub dataset, not with a mixture; turn streaming off")
    train_parts, eval_parts = [], []
    for source in sources:
        common = _source_args(cfg, source, lang)
        train_split = source.get("train_split") or cfg.train_split
        train_parts.append((source["label"], load_records(source["name"], train_split, **common)))
        evals = None if cfg.eval_sets else _eval_part(cfg, source, common)  # named sets: load_eval_sets
        if evals is not None:
            eval_parts.append((source["label"], evals))
    if len(sources) == 1:
        train, evals = train_parts[0][1], (eval_parts[0][1] if eval_parts else [])
    else:
        train, counts = mix(train_parts, [s.get("weight") for s in sources], cfg.seed)
        say("mixture, samples per epoch: " + ", ".join(
            f"{label} {c} ({len(records)} records{', weight ' + str(s['weight']) if s.get('weight') is not None else ''})"
            for (label, records), c, s in zip(train_parts, counts, sources)))
        evals = mix(eval_parts, [None] * len(eval_parts), cfg.seed)[0] if eval_parts else []
    where = f"{cfg.dataset_name} split {cfg.train_split!r}" if len(sources) == 1 else "the mixture"

    bad = []
    if isinstance(train, list):  # a streamed split's samples are only checked as they are drawn
        train = train[: cfg.max_train_samples or None]
        if cfg.replay_dataset:
            train = with_replay(train, cfg, lang, say)
        bad = _check_train(train, prepare, cfg, where)
    elif cfg.max_train_samples:
        train = train.take(cfg.max_train_samples)

    evals, eval_bad = _checked_evals(evals, prepare, cfg, f"{cfg.dataset_name} split {cfg.eval_split!r}") \
        if not cfg.eval_sets else ([], [])
    size = len(train) if isinstance(train, list) else "streamed"
    say(f"data: {size} training samples ({cfg.train_split})"
        + (f", {len(evals)} evaluation samples ({cfg.eval_split})" if not cfg.eval_sets else ""))
    step_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if isinstance(train, list) and len(train) < max(step_batch, FEW_SAMPLES):  # trains, but on what?
        say(f"warning: only {len(train)} training samples ({where}), "
            + (f"fewer than one optimizer step's batch of {step_batch}" if len(train) < step_batch else
               f"fewer than {FEW_SAMPLES}") + f": each of the {cfg.max_steps} steps repeats them, so the model "
            "memorises them rather than learns; check train_split and the data's split column")
    if bad:
        say(f"{len(bad)} training samples are unusable and will be skipped and counted when drawn: {describe(bad)}")
    if eval_bad:
        say(f"skipped {len(eval_bad)} evaluation samples before starting: {describe(eval_bad)}")
    for label, part in train_parts:
        if isinstance(part, list):
            _warn_duplicates(part, f"training ({label or where})", say)
    _warn_overlap(train, evals, "evaluation", say)
    return train, evals


def _warn_overlap(train, evals: list, what: str, say) -> None:
    """Warn about evaluation samples that are training samples too (their WER flatters the model) and about
    duplicate evaluation rows. A streamed training split cannot be compared and is not."""
    if not evals or not isinstance(train, list):
        _warn_duplicates(evals, what, say)
        return
    train_ids = {r.id for r in train}
    if all(r.id in train_ids for r in evals):
        say(f"warning: all {len(evals)} {what} samples are training samples too (a manifest without a "
            "split column gives every split all its rows): the evaluation measures memorisation, not accuracy")
    else:
        train_audio = {_audio_key(r) for r in train}
        shared = [r for r in evals if _audio_key(r) in train_audio]
        if shared:
            say(f"warning: {len(shared)} of {len(evals)} {what} samples are also training samples (same audio "
                "file): their WER flatters the model; first: " + ", ".join(r.id for r in shared[:3]))
    _warn_duplicates(evals, what, say)


def _warn_duplicates(records: list, what: str, say) -> None:
    dups = _duplicates(records)
    if dups:
        say(f"warning: {len(dups)} exact duplicate rows (same audio and transcript) in the {what} data: they "
            "count twice; first: " + ", ".join(dups[:3]))


def _check_train(train: list, prepare, cfg: Config, where: str) -> list[Bad]:
    """The unusable training records; an error when none is usable, too many are, or no audio file exists."""
    from collections import Counter
    from pathlib import Path

    from whisper_ft.stopping import bad_share_surely_over

    bad = _usable(train, prepare)[1]
    if len(bad) == len(train):
        raise DataError(f"no usable training sample in {where}"
                        + (f" ({len(bad)} unusable: {describe(bad)})" if bad else ""))
    if bad_share_surely_over(len(bad), len(train), cfg.max_bad_sample_fraction):  # the loop's rule, see there
        reason, n = Counter(b.reason for b in bad).most_common(1)[0]
        raise DataError(f"{len(bad)} of {len(train)} training samples in {where} are unusable "
                        f"({100 * len(bad) / len(train):.0f}%, over max_bad_sample_fraction "
                        f"{cfg.max_bad_sample_fraction}); commonest reason: {reason} ({n}); first: "
                        + name_first(bad, 5, detail=True))
    files = [r.path for r in train[:2000] if r.path and r.audio_bytes is None and r.fetch is None]
    if files and not any(Path(f).is_file() for f in files):
        raise DataError(f"none of the {len(files)} audio files checked in {where} exists (first: {files[0]}); "
                        "paths in a manifest are relative to the manifest's folder")
    return bad


def _audio_key(record) -> str:
    """The audio a record points to: its file, or (bytes from a Hub dataset) its id."""
    import os
    return os.path.normpath(record.path) if record.path else record.id  # no syscalls: corpora have 1M rows


def _duplicates(records) -> list[str]:
    """Ids of rows repeating an earlier row's audio and transcript exactly (a copy-paste or a joined export)."""
    seen, dups = set(), []
    for r in records:
        key = (_audio_key(r), r.text.strip())
        if r.problem:
            continue
        if key in seen:
            dups.append(r.id)
        seen.add(key)
    return dups


def with_replay(train: list, cfg: Config, lang, say) -> list:
    """The training records plus replay_dataset's share of each epoch (replay_fraction), drawn as a mixture
    source is: the domain's records once each, then general speech, so that fine-tuning keeps seeing what the
    base model already knew. The replay source's columns are found by name, not taken from the run's."""
    import numpy as np

    from whisper_ft.sources import draw

    general = load_records(cfg.replay_dataset, cfg.replay_split, lang=lang, text_column="", audio_column="",
                           dataset_config="", revision="", cache_dir=cfg.dataset_cache, token=cfg.hf_token,
                           streaming=False)
    if not general:
        raise DataError(f"replay_dataset {cfg.replay_dataset} split {cfg.replay_split!r} has no samples")
    count = round(cfg.replay_fraction / (1 - cfg.replay_fraction) * len(train))
    say(f"replay: {count} samples per epoch from {cfg.replay_dataset} ({len(general)} records), "
        f"{cfg.replay_fraction:.0%} of {len(train) + count}")
    return train + draw(general, count, np.random.default_rng(cfg.seed), "replay")


def _source_args(cfg: Config, source: dict[str, Any], lang) -> dict[str, Any]:
    """load_records' arguments for one source: its own columns, config and revision, else the run's."""
    return dict(lang=lang, text_column=source.get("text_column") or cfg.text_column,
                audio_column=source.get("audio_column") or cfg.audio_column,
                dataset_config=source.get("dataset_config") or cfg.dataset_config,
                revision=source.get("dataset_revision") or cfg.dataset_revision, cache_dir=cfg.dataset_cache,
                token=cfg.hf_token, streaming=cfg.streaming)


def _eval_part(cfg: Config, source: dict[str, Any], common: dict[str, Any]) -> list | None:
    """One source's evaluation records (a streamed split read up to max_eval_samples), or None for none."""
    from itertools import islice

    eval_split = cfg.eval_split if source.get("eval_split") is None else source["eval_split"]
    if cfg.eval_strategy == "no" or not eval_split:
        return None
    evals = load_records(source["name"], eval_split, **common)
    if not isinstance(evals, list):  # streamed: read it (up to max_eval_samples) so it can be sharded
        evals = list(islice(evals, cfg.max_eval_samples or None))
    return evals


def _checked_evals(evals: list, prepare, cfg: Config, where: str) -> tuple[list, list[Bad]]:
    """The usable evaluation records (at most max_eval_samples) and the unusable ones; none usable is an error."""
    keep, eval_bad = _usable(evals, prepare)
    evals = [evals[i] for i in keep][: cfg.max_eval_samples or None]
    if cfg.eval_strategy != "no" and not evals:
        raise DataError(f"no usable evaluation sample in {where}"
                        + (f" ({len(eval_bad)} unusable: {reasons(eval_bad)})" if eval_bad else ""))
    return evals, eval_bad


def load_eval_sets(cfg: Config, lang, prepare, say, default_evals: list, train=None) -> dict[str, list]:
    """name -> evaluation records. Without eval_sets: {"eval": the records load_data read from eval_split}.

    Each named set is read like the run's own eval split (a mixture file too), checked, capped at
    max_eval_samples, and compared with the training records as load_data compares eval_split; the order is
    the config's, and the first set chooses the best model.
    """
    import dataclasses

    from whisper_ft.config import eval_set_specs
    from whisper_ft.sources import mix, read_mixture

    if not cfg.eval_sets:
        return {"eval": default_evals}
    if cfg.eval_strategy == "no":
        return {}
    sets = {}
    for name, spec in eval_set_specs(cfg).items():
        view = dataclasses.replace(cfg, eval_split=spec["split"], streaming=False,
                                   **{k: spec[k] for k in ("dataset_name", "dataset_config", "dataset_revision",
                                                           "text_column", "audio_column")})
        sources = read_mixture(view.dataset_name) or [{"name": view.dataset_name, "label": ""}]
        parts = [(s["label"], _eval_part(view, s, _source_args(view, s, lang))) for s in sources]
        parts = [(label, records) for label, records in parts if records is not None]
        records = parts[0][1] if len(parts) == 1 else mix(parts, [None] * len(parts), cfg.seed)[0]
        records, bad = _checked_evals(records, prepare, view, f"eval set {name!r} ({view.dataset_name} "
                                                                f"split {view.eval_split!r})")
        say(f"eval set {name}: {len(records)} samples ({view.dataset_name}, split {view.eval_split})"
            + (f"; skipped {len(bad)}: {reasons(bad)}" if bad else ""))
        _warn_overlap(train, records, f"eval set {name!r}", say)
        sets[name] = records
    return sets


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


def eval_loader(records, prepare, collate, cfg: Config, rank: int, world: int):
    """This process's share of the eval set: every sample on exactly one process, none padded in.

    Ordered by length, so that a batch's samples finish generating at about the same step: Whisper pads
    every clip to 30 s, so a batch costs what its longest transcript costs. Results are sorted by id after.
    """
    order = sorted(range(len(records)), key=lambda i: length_key(records[i]))
    mine = order[rank::world]
    return torch.utils.data.DataLoader(torch.utils.data.Subset(RecordDataset(records, prepare), mine),
                                       batch_size=cfg.per_device_eval_batch_size, collate_fn=collate,
                                       num_workers=cfg.dataloader_num_workers, shuffle=False,
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and Ctrl-C to the trainer: a signal to the process group (launch.sh's
    stop, a terminal's Ctrl-C) would otherwise end them, and the next batch, which the trainer still needs
    before it saves, would fail. They end with the trainer, as always."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def length_key(record) -> tuple[int, float]:
    """What predicts a sample's generation time, known without decoding audio: the reference transcript's
    length (the prediction's length follows it), then the audio duration where the source gives it."""
    return len(record.text or ""), record.duration or 0.0


# The training stream: what the loop draws micro-batches from. Both kinds below are endless iterators of
# collated batches with state_dict()/load_state_dict() (the process's data position, saved in the checkpoint)
# and epochs(samples_seen); train_batches() picks one, and the loop never asks which it has.


class MapBatches:
    """Collated batches of a record list, through a DataLoader, in TrainBatches' seeded order.

    The position is a function of the optimizer step (TrainBatches starts `start_step` steps in), so there
    is nothing to save: state_dict() is None, and a resumed run is built at its step instead.
    """

    def __init__(self, records: list, prepare, collate, cfg: Config, rank: int, world: int, start_step: int):
        from whisper_ft.data import TrainBatches

        self.samples_per_epoch = len(records)
        self._it = iter(torch.utils.data.DataLoader(
            RecordDataset(records, prepare), collate_fn=collate, num_workers=cfg.dataloader_num_workers,
            batch_sampler=TrainBatches(len(records), cfg.per_device_train_batch_size, cfg.seed, rank, world,
                                       start=start_step * cfg.gradient_accumulation_steps),
            generator=torch.Generator(),  # its own RNG: creating the loader must not shift dropout's (exact resume)
            pin_memory=torch.cuda.is_available(),  # page-locked batches: the copy to the GPU runs asynchronously
            persistent_workers=cfg.dataloader_num_workers > 0, worker_init_fn=ignore_stop_signals))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: None) -> None:
        pass  # built at the resumed step already

    def close(self) -> None:
        """End the data workers now. They ignore SIGTERM (ignore_stop_signals), so the SIGTERM with which
        Python's exit would otherwise end them would leave the run hanging at exit."""
        from whisper_ft import compat

        it, self._it = self._it, None
        compat.shutdown_loader_workers(it)

    def epochs(self, samples_seen: int) -> float:
        return samples_seen / self.samples_per_epoch


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
                self.stream.set_epoch(self.epoch)
                self._it = iter(self.stream)
            try:
                # the epoch is the draw: a record appears once per epoch of a stream
                samples.append(self.prepare(next(self._it), draw=self.epoch))
                self._rows_this_epoch += 1
            except StopIteration:
                if not self._rows_this_epoch:
                    raise DataError("the streamed training split has no rows for this process") from None
                self.epoch, self._it, self._rows_this_epoch = self.epoch + 1, None, 0
        return self.collate(samples)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stream": self.stream.state_dict() if self._it is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            from whisper_ft.checkpoint import CheckpointError
            raise CheckpointError("the checkpoint holds no position in the streamed training data for this process "
                                  "(was it saved by a run without streaming?)")
        self.epoch = state["epoch"]
        if state["stream"] is not None:
            self.stream.set_epoch(self.epoch)
            self.stream.load_state_dict(state["stream"])
            self._it = iter(self.stream)

    def close(self) -> None:
        pass  # read in this process: no workers

    def epochs(self, samples_seen: int) -> None:
        return None  # a stream's length is unknown


def train_batches(records, prepare, collate, cfg: Config, rank: int, world: int, start_step: int):
    """This process's training stream, starting `start_step` optimizer steps in: a MapBatches over a record
    list, or a StreamBatches over a streamed Hub dataset (its position comes from the checkpoint)."""
    if isinstance(records, list):
        return MapBatches(records, prepare, collate, cfg, rank, world, start_step)
    return StreamBatches(records, prepare, collate, cfg.per_device_train_batch_size, rank, world)


def count_group(accelerator):
    """The process group that sums step_totals on the host (gloo), or None: on the device, or only one process.

    The counts are host numbers. Summed on the GPU, reading the sum back waits for the whole step queued before it,
    and the card idles while the host queues the next (DESIGN: host syncs); over gloo they never touch the GPU.
    Only where every process is on one machine: across machines gloo must find the right network interface by
    itself (else GLOO_SOCKET_IFNAME), and a multi-node run whose NCCL works must not fail on that at its start.
    Called once by every process, at setup: creating a group is a collective.
    """
    world, dist = accelerator.num_processes, torch.distributed
    if world == 1 or os.environ.get("LOCAL_WORLD_SIZE") != str(world):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def step_totals(micro: list[dict[str, Any]], accelerator, stop: bool,
                group=None) -> tuple[int, int, float, int, int, bool]:
    """(label tokens, samples, audio seconds, bad samples, samples drawn) of one optimizer step, all processes, and
    whether any process was asked to stop (`stop`: this one was).

    One process counts on the host; several sum theirs in one all-reduce: on the host over `group`
    (count_group), else on the device, the loop's one read-back per step in a run across machines.
    """
    local = [sum(mb["tokens"] for mb in micro), sum(len(mb["ids"]) for mb in micro),
             sum(mb["seconds"] for mb in micro), sum(len(mb["bad"]) for mb in micro),
             sum(len(mb["ids"]) + len(mb["bad"]) for mb in micro), int(stop)]
    if group is not None:
        totals = torch.tensor(local, dtype=torch.float64)
        torch.distributed.all_reduce(totals, group=group)
        local = totals.tolist()
    elif accelerator.num_processes > 1:
        local = accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    tokens, samples, seconds, bad, seen, stops = local
    return int(tokens), int(samples), seconds, int(bad), int(seen), stops > 0


def gather_bad(micro: list[dict[str, Any]]) -> list[Bad]:
    from accelerate.utils import gather_object

    return [b for part in gather_object([[b for mb in micro for b in mb["bad"]]]) for b in part]


def batch_or_placeholder(batch, model, device):
    """A micro-batch whose samples were all bad still runs a zero-loss step, so processes stay in step."""
    if batch["ids"]:  # non_blocking: with pinned memory the copy overlaps the work already queued on the GPU
        return batch["input_features"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
    config = model.module.config if hasattr(model, "module") else model.config
    features = torch.zeros(1, config.num_mel_bins, 2 * config.max_source_positions, device=device)
    return features, torch.full((1, 1), IGNORE_INDEX, dtype=torch.long, device=device)
