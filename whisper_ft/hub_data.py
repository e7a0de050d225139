"""Hugging Face Hub datasets as Records, with messages a user can act on when loading fails."""

from __future__ import annotations

from whisper_ft.data import AUDIO_COLUMNS, TEXT_COLUMNS, DataError, Record, _pick_column

CV_MOVED = ("Common Voice is no longer distributed on the Hub: download a release for your language from the "
            "Mozilla Data Collective (https://datacollective.mozillafoundation.org), extract it and set "
            "dataset_name to the extracted cv-corpus-*/<locale> folder (or to cv-corpus-* with lang choosing the "
            "subfolder), or point dataset_name at a parquet mirror on the Hub.")


def hub_records(name: str, split: str, *, lang, text_column: str, audio_column: str, config: str, revision: str,
                cache_dir: str, token: str, streaming: bool):
    import datasets

    config = config or (lang.dataset_config(name) if lang is not None else None) or None
    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision or None, cache_dir=cache_dir or None,
                                   token=token or None, streaming=streaming)
    except Exception as e:  # datasets raises many types; translate the ones users meet into actions
        raise DataError(_explain(name, config, split, e, bool(token))) from None
    columns = list(ds.features) if ds.features else []
    row = dict.fromkeys(columns)
    text_col = _pick_column(row, text_column, TEXT_COLUMNS, "text", name)
    audio_col = _pick_column(row, audio_column, AUDIO_COLUMNS, "audio", name)
    if isinstance(ds.features[audio_col], datasets.Audio):
        ds = ds.cast_column(audio_col, datasets.Audio(decode=False))  # we decode with soundfile: no FFmpeg
    ds = ds.select_columns([audio_col, text_col])
    if streaming:
        return HubStream(ds, audio_col, text_col)
    return HubRecords(ds, audio_col, text_col)


def _to_record(row: dict, index: int | str, audio_col: str, text_col: str) -> Record:
    audio = row[audio_col]
    if isinstance(audio, dict):
        path, data = audio.get("path"), audio.get("bytes")
    else:
        path, data = str(audio), None
    return Record(id=f"{path or 'row'}#{index}", text=row[text_col] or "", path=path, audio_bytes=data)


class HubRecords:
    """Indexable view of a downloaded (memory-mapped) dataset; safe to use from DataLoader workers."""

    def __init__(self, ds, audio_col: str, text_col: str):
        self.ds, self.audio_col, self.text_col = ds, audio_col, text_col

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Record:
        return _to_record(self.ds[int(i)], i, self.audio_col, self.text_col)

    def texts(self) -> list[str]:
        return [t or "" for t in self.ds[self.text_col]]


class HubStream:
    """A streamed dataset as Records, sharded per process, with a resumable position."""

    def __init__(self, ds, audio_col: str, text_col: str):
        self.ds, self.audio_col, self.text_col = ds, audio_col, text_col

    def shard(self, rank: int, world: int) -> "HubStream":
        from datasets.distributed import split_dataset_by_node  # each rank reads its own rows (pitfall 5)
        return HubStream(split_dataset_by_node(self.ds, rank=rank, world_size=world), self.audio_col, self.text_col)

    def __iter__(self):
        for i, row in enumerate(self.ds):
            yield _to_record(row, i, self.audio_col, self.text_col)

    def state_dict(self) -> dict:
        return self.ds.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ds.load_state_dict(state)


def _explain(name: str, config: str | None, split: str, e: Exception, have_token: bool) -> str:
    text = f"{type(e).__name__}: {e}"
    if "scripts are no longer supported" in text or "trust_remote_code" in text:
        msg = f"{name} is a script-based dataset, which datasets 4+ cannot load."
        if "common_voice" in name.lower():
            return f"{msg} {CV_MOVED}"
        return f"{msg} Try dataset_revision: refs/convert/parquet (the Hub's parquet copy) or a parquet mirror."
    if "gated" in text.lower() or "401" in text or "403" in text:
        how = ("your token has no access: open the dataset page on the Hub, accept its conditions with the account "
               "that owns the token") if have_token else \
            "no Hub token was found: set HF_TOKEN or run `hf auth login` after accepting the dataset's conditions"
        return f"{name} is gated; {how}."
    if "BuilderConfig" in text or "config name" in text.lower() or "Config name is missing" in text:
        return f"{name} has no config {config!r}; set dataset_config (the error was: {str(e).splitlines()[0][:300]})"
    if "Unknown split" in text or "split" in text.lower() and "not" in text.lower():
        return f"{name} has no split {split!r}: {str(e).splitlines()[0][:300]}"
    if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
        return f"could not reach the Hub to load {name} ({text.splitlines()[0][:200]}); check the network or use a local copy"
    return f"could not load dataset {name!r} (config {config!r}, split {split!r}): {text.splitlines()[0][:400]}"
