"""Hugging Face Hub datasets as Records, with messages a user can act on when loading fails."""

from __future__ import annotations

from whisper_ft.columns import AUDIO_COLUMNS, SPLIT_SYNONYMS, TEXT_COLUMNS, pick_column, split_names
from whisper_ft.data import DataError, Record

CV_MOVED = ("Common Voice is no longer distributed on the Hub: download a release for your language from the "
            "Mozilla Data Collective (https://datacollective.mozillafoundation.org), extract it and set "
            "dataset_name to the extracted cv-corpus-*/<locale> folder (or to cv-corpus-* with lang choosing the "
            "subfolder), or point dataset_name at a parquet mirror on the Hub.")


def hub_records(name: str, split: str, *, lang, text_column: str, audio_column: str, config: str, revision: str,
                cache_dir: str, token: str, streaming: bool):
    import datasets

    config = config or (lang.dataset_config(name) if lang is not None else None) or None
    ds = _load(name, config, split, revision=revision or None, cache_dir=cache_dir or None, token=token or None,
               streaming=streaming)
    columns = list(ds.features) if ds.features else []
    row = dict.fromkeys(columns)
    text_col = pick_column(row, text_column, TEXT_COLUMNS, "text", name)
    audio_col = pick_column(row, audio_column, AUDIO_COLUMNS, "audio", name)
    if isinstance(ds.features[audio_col], datasets.Audio):
        ds = ds.cast_column(audio_col, datasets.Audio(decode=False))  # we decode with soundfile: no FFmpeg
    ds = ds.select_columns([audio_col, text_col])
    if streaming:
        return HubStream(ds, audio_col, text_col)
    return lazy_records(ds, audio_col, text_col)


def _load(name: str, config: str | None, split: str, **kwargs):
    """load_dataset, trying dev/validation/valid for one another when the split asked for does not exist."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as e:  # datasets raises many types; translate the ones users meet into actions
        error = e
    if ("Unknown split" in str(error) or "Bad split" in str(error)) and any(s.strip() in SPLIT_SYNONYMS
                                                                           for s in split.split("+")):
        available = str(error)  # ... Should be one of ['train', 'validation'] / Available splits: [...]
        renamed = "+".join(next((n for n in split_names(s.strip()) if f"'{n}'" in available), s.strip())
                           for s in split.split("+"))
        if renamed != split:
            try:
                return datasets.load_dataset(name, config, split=renamed, **kwargs)
            except Exception as e:
                error = e
    raise DataError(_explain(name, config, split, error, bool(kwargs.get("token")))) from None


def _to_record(row: dict, index: int | str, audio_col: str, text_col: str) -> Record:
    audio = row[audio_col]
    if isinstance(audio, dict):
        path, data = audio.get("path"), audio.get("bytes")
    else:
        path, data = str(audio), None
    return Record(id=f"{path or 'row'}#{index}", text=row[text_col] or "", path=path, audio_bytes=data)


def lazy_records(ds, audio_col: str, text_col: str) -> list[Record]:
    """A Record per row of a downloaded (memory-mapped) dataset, without its audio: each fetches its own bytes
    when decoded, so a large dataset is not copied into memory (nor into every DataLoader worker)."""
    paths = [None] * len(ds)
    try:  # the file names inside the audio column, read without touching the audio bytes
        import pyarrow.compute as pc

        column = ds.data.column(audio_col)
        from whisper_ft.compat import dataset_rows_in_table_order

        if dataset_rows_in_table_order(ds):
            paths = (pc.struct_field(column, "path") if hasattr(column.type, "get_field_index") else column).to_pylist()
    except Exception:  # an unusual layout: the ids name rows only
        pass
    return [Record(id=f"{path or 'row'}#{j}", text=text or "", path=path, fetch=RowAudio(ds, audio_col, j))
            for j, (path, text) in enumerate(zip(paths, ds[text_col]))]


class RowAudio:
    """The encoded audio of one dataset row, read when called (in a DataLoader worker)."""

    __slots__ = ("ds", "column", "row")

    def __init__(self, ds, column: str, row: int):
        self.ds, self.column, self.row = ds, column, row

    def __call__(self) -> bytes | None:
        audio = self.ds[self.row][self.column]
        if isinstance(audio, dict):
            if audio.get("bytes") is not None:
                return audio["bytes"]
            audio = audio.get("path")
        with open(audio, "rb") as f:  # a dataset that stores local file paths only
            return f.read()


class HubStream:
    """A streamed dataset as Records, sharded per process, with a resumable position."""

    def __init__(self, ds, audio_col: str, text_col: str):
        self.ds, self.audio_col, self.text_col = ds, audio_col, text_col
        # Rows read in this epoch: part of each record's id (path#row), so a resumed stream must go on
        # counting where it stopped; the id seeds timestamp_probability's draw (exact resume).
        self.row, self._resume_row = 0, 0

    def shard(self, rank: int, world: int) -> "HubStream":
        # each rank reads its own rows (DESIGN: dispatched batches)
        from datasets.distributed import split_dataset_by_node
        return HubStream(split_dataset_by_node(self.ds, rank=rank, world_size=world), self.audio_col, self.text_col)

    def __iter__(self):
        self.row, self._resume_row = self._resume_row, 0
        for row in self.ds:
            self.row += 1
            yield _to_record(row, self.row - 1, self.audio_col, self.text_col)

    def take(self, n: int) -> "HubStream":
        """The first n rows only (max_train_samples)."""
        return HubStream(self.ds.take(n), self.audio_col, self.text_col)

    def set_epoch(self, epoch: int) -> None:
        """The epoch seeds a shuffled stream's order (datasets' set_epoch)."""
        self.ds.set_epoch(epoch)

    def state_dict(self) -> dict:
        return {"dataset": self.ds.state_dict(), "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        if "dataset" not in state:  # a checkpoint from before the row count: the dataset's state alone
            state = {"dataset": state, "row": 0}
        self.ds.load_state_dict(state["dataset"])
        self._resume_row = state["row"]


def _explain(name: str, config: str | None, split: str, e: Exception, have_token: bool) -> str:
    text = f"{type(e).__name__}: {e}"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "scripts are no longer supported" in text or "trust_remote_code" in text:
        msg = f"{name} is a script-based dataset, which datasets 4+ cannot load."
        if "common_voice" in name.lower() or "commonvoice" in name.lower():
            return f"{msg} {CV_MOVED}"
        return f"{msg} Try dataset_revision: refs/convert/parquet (the Hub's parquet copy) or a parquet mirror."
    if "gated" in text.lower() or "401" in text or "403" in text:
        how = ("your token has no access: open https://huggingface.co/datasets/" + name + " and accept its conditions "
               "with the account that owns the token") if have_token else \
            ("no Hub token was found: accept its conditions on https://huggingface.co/datasets/" + name +
             ", then set HF_TOKEN (or run `hf auth login`, or set hf_token)")
        return f"{name} is gated; {how}."
    if "doesn't exist on the Hub" in text or "DatasetNotFoundError" in text:
        return (f"{name} was not found on the Hub (nor as a local folder or file); check the spelling"
                + ("" if have_token else ", and if it is private or gated, set HF_TOKEN") + ".")
    if "BuilderConfig" in text or "config name" in text.lower() or "Config name is missing" in text:
        return f"{name} has no config {config!r}; set dataset_config (the error was: {first[:300]})"
    if "Unknown split" in text or "Bad split" in text or "split" in text.lower() and "not" in text.lower():
        return f"{name} has no split {split!r}: {first[:300]}"
    if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower() or "reach" in text.lower():
        return (f"could not reach the Hub to load {name} ({first[:200]}); check the network (and HF_HUB_OFFLINE), "
                "or use a local copy")
    return f"could not load dataset {name!r} (config {config!r}, split {split!r}): {first[:400]}"
