"""Where training records come from (audio path or bytes + transcript); no audio is decoded here.

A source is a local Common Voice release folder (clips/ and CV's TSVs: train.tsv, dev.tsv, test.tsv or
validated.tsv; clips/ alone is not enough, since manifest folders and audiofolders use it too), or the
cv-corpus-* folder above it with `lang` choosing the locale subfolder; a CSV / TSV / JSONL manifest
of audio path + text (paths relative to the manifest), a folder of `<split>.csv` manifests, or an
audiofolder (`metadata.csv` beside the clips); a Hugging Face Hub dataset or a local parquet copy of
one (whisper_ft/hub_data.py); or a mixture of any of these (`read_mixture`, `mix`), each with an
optional weight. Every source but a streamed Hub dataset gives a plain list of Records
(whisper_ft/data.py, which turns them into model inputs). A line of a table that cannot be read
becomes a Record with a `problem`, so it is counted like any other bad sample instead of stopping
the run (or vanishing).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from whisper_ft.columns import AUDIO_COLUMNS, SPLIT_SYNONYMS, TEXT_COLUMNS, pick_column, split_names
from whisper_ft.data import DataError, Record

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


# ---------------------------------------------------------------------------------------------
# Sources


def load_records(dataset_name: str, split: str, *, lang=None, text_column: str = "", audio_column: str = "",
                 dataset_config: str = "", revision: str = "", cache_dir: str = "", token: str = "",
                 streaming: bool = False):
    """Records of `split` ("train+dev" joins splits): a list, or an iterable HubStream when streaming a Hub dataset.

    A mixture gives its sources' records of `split`, joined, without weights (batches.load_data applies
    them, and each source's own splits, for training).
    """
    sources = read_mixture(dataset_name)
    if sources:
        return mix([(s["label"], load_records(
            s["name"], split, lang=lang, text_column=s.get("text_column") or text_column,
            audio_column=s.get("audio_column") or audio_column, dataset_config=s.get("dataset_config") or dataset_config,
            revision=s.get("dataset_revision") or revision, cache_dir=cache_dir, token=token)) for s in sources],
            [None] * len(sources), seed=0)[0]
    path = Path(dataset_name).expanduser()
    cv = _common_voice_folder(path, lang)
    if cv is not None:
        return [r for s in _parts(split) for r in _common_voice(cv, s, text_column)]
    if path.is_file() or path.suffix.lower() in MANIFEST_SUFFIXES:
        return _manifest(path, split, text_column, audio_column)
    if path.is_dir():
        manifests = {s: _split_manifest(path, s) for s in _parts(split)}
        if all(manifests.values()):
            return [r for s, m in manifests.items() for r in _manifest(m, s, text_column, audio_column)]
        missing = next(s for s, m in manifests.items() if m is None)
        present = sorted([p.name for p in path.iterdir() if p.suffix.lower() in MANIFEST_SUFFIXES]
                         + [f"{p.parent.name}/{p.name}" for p in path.glob("*/metadata.*")])
        if present:  # other splits have their files: this one is missing
            raise DataError(f"split {missing!r} not found in {path}: no {missing}.csv, .tsv or .jsonl there, and no "
                            f"{missing}/metadata.csv; found: {', '.join(present)}")
        hub_like = any(path.glob("**/*.parquet")) or (path / f"{path.name}.py").is_file()
        if not hub_like:  # parquet: a local copy of a Hub dataset; <name>.py: a script dataset (clear message)
            raise DataError(f"{dataset_name} is a folder, but not a Common Voice release (no clips/ with train.tsv, "
                            f"dev.tsv, test.tsv or validated.tsv in it{', in ' + lang.cv_locale + '/' if lang else ''} "
                            "or in cv-corpus-*/<locale>/), no "
                            "audiofolder (metadata.csv beside the clips), no <split>.csv/.tsv/.jsonl manifests and no "
                            "parquet files")
        revision, token = "", ""
    elif not path.exists() and _looks_like_path(dataset_name):  # not a Hub id: say so, not "check the network"
        raise DataError(f"dataset {dataset_name} does not exist: no such file or folder ({path.resolve()})")
    from whisper_ft.hub_data import hub_records  # imports datasets only when needed
    return hub_records(str(path) if path.is_dir() else dataset_name, split, lang=lang, text_column=text_column,
                       audio_column=audio_column, config=dataset_config, revision=revision, cache_dir=cache_dir,
                       token=token, streaming=streaming)


def _looks_like_path(name: str) -> bool:
    """A name meant as a local path (a Hub dataset id is `name` or `owner/name`)."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def _delimiter_problem(path: Path, header: list[str]) -> None:
    """A .tsv whose header is comma-separated (or a .csv's tab-separated) would read as one column: say so."""
    if len(header) != 1:
        return
    other = {",": "comma", "\t": "tab", ";": "semicolon"}
    for sep, word in other.items():
        if header[0].count(sep) >= 1 and sep != ("\t" if path.suffix.lower() == ".tsv" else ","):
            want = {",": ".csv", "\t": ".tsv"}.get(sep)
            raise DataError(f"{path} is named {path.suffix} but its header is {word}-separated "
                            f"({header[0][:80]!r})" + (f": rename it to {path.stem}{want}" if want else
                                                       ": save it comma-separated (.csv) or tab-separated (.tsv)"))


def _parts(split: str) -> list[str]:
    return [s.strip() for s in split.split("+") if s.strip()]


CV_TSVS = ("train.tsv", "dev.tsv", "test.tsv", "validated.tsv")  # what makes a folder a Common Voice release


def _is_common_voice(folder: Path) -> bool:
    """clips/ and Common Voice's own TSVs: a clips/ folder alone is also how people lay out their manifests."""
    return (folder / "clips").is_dir() and any((folder / name).is_file() for name in CV_TSVS)


def _common_voice_folder(path: Path, lang) -> Path | None:
    """The locale folder (clips/ and CV's TSVs) that `path` names, or that `lang` chooses under a cv-corpus-* folder."""
    if _is_common_voice(path):
        return path
    if not path.is_dir():
        return None
    locales = sorted({c.parent for pattern in ("*/clips", "cv-corpus-*/*/clips") for c in path.glob(pattern)
                      if _is_common_voice(c.parent)})
    if not locales:
        return None
    names = ", ".join(str(p.relative_to(path)) for p in locales)
    if lang is None:
        raise DataError(f"{path} holds Common Voice locales ({names}); set lang to choose one")
    exact = [p for p in locales if p.name.lower() == lang.cv_locale.lower()]
    same = exact or [p for p in locales if _whisper_code(p.name) == lang.code]
    if len(same) == 1:
        return same[0]
    if same:
        raise DataError(f"{path} holds several Common Voice folders for lang {lang.code!r}: "
                        f"{', '.join(str(p.relative_to(path)) for p in same)}; set dataset_name to the one to use")
    raise DataError(f"{path} holds Common Voice locales {names}, none for lang {lang.code!r} ({lang.name}, "
                    f"Common Voice locale {lang.cv_locale!r}); set lang to one of them or download that locale")


def _whisper_code(locale: str) -> str | None:
    from whisper_ft.languages import LanguageError, resolve
    try:
        return resolve(locale).code
    except LanguageError:
        return None


def _common_voice(folder: Path, split: str, text_column: str = "") -> list[Record]:
    tsv = next((folder / f"{n}.tsv" for n in split_names(split) if (folder / f"{n}.tsv").is_file()), None)
    if tsv is None:
        have = sorted(p.stem for p in folder.glob("*.tsv") if p.stem not in ("clip_durations", "reported"))
        raise DataError(f"split {split!r} not found in {folder}: no {split}.tsv; splits there: {', '.join(have)}")
    durations = {}
    if (folder / "clip_durations.tsv").is_file():  # lets us drop >30 s clips without decoding them
        for _, row in _read_rows(folder / "clip_durations.tsv")[0]:
            durations[row.get("clip")] = _seconds(row.get("duration[ms]"), 1000)
    rows, problems = _read_rows(tsv)
    columns = rows[0][1] if rows else {}
    text_col = text_column or "sentence"
    if rows and ("path" not in columns or text_col not in columns):
        raise DataError(f"{tsv} is not a Common Voice TSV: it needs columns path and {text_col}; "
                        f"it has {', '.join(columns)}")
    records = [Record(id=r["path"] or f"{tsv.name}:{n}", text=r[text_col], duration=durations.get(r["path"]),
                      path=str(folder / "clips" / r["path"]) if r["path"] else None) for n, r in rows]
    return _with_problems(records, problems, tsv)


def _seconds(value: Any, per_second: float = 1.0) -> float | None:
    try:
        seconds = float(value) / per_second
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def _with_problems(records: list[Record], problems: list[tuple[int, str]], source: Path) -> list[Record]:
    """Unreadable lines join the records (after the readable ones), so they are counted as bad samples when drawn."""
    records += [Record(id=f"{source.name}:{n}", text="", problem=why) for n, why in problems]
    return records


def _read_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
    """(line number, row) of every readable row, and (line number, why) of every line that is not.

    TSVs are read with quoting off: Common Voice sentences hold unbalanced quotes. A line
    with a different number of fields than the header, or bytes that are not UTF-8, is a problem line.
    """
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    rows, problems = [], []
    if suffix in (".jsonl", ".json"):
        text = raw.decode("utf-8-sig", errors="replace")
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                items = list(enumerate(json.loads(text), start=1))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} is not valid JSON: {e}") from None
            return ([(i, r) for i, r in items if isinstance(r, dict)],
                    [(i, "not a JSON object") for i, r in items if not isinstance(r, dict)])
        for n, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append((n, f"not JSON: {e.msg}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"))
                continue
            (rows.append((n, row)) if isinstance(row, dict) else problems.append((n, "not a JSON object")))
        return rows, problems
    if suffix == ".tsv":
        lines = raw.split(b"\n")
        header = lines[0].decode("utf-8-sig", errors="replace").rstrip("\r").split("\t")
        _delimiter_problem(path, header)
        for n, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                fields = line.decode("utf-8").rstrip("\r").split("\t")
            except UnicodeDecodeError:
                problems.append((n, "not UTF-8"))
                continue
            if len(fields) != len(header):
                problems.append((n, f"{len(fields)} fields, the header has {len(header)}"))
                continue
            rows.append((n, dict(zip(header, fields))))
        return rows, problems
    reader = csv.reader(io.StringIO(raw.decode("utf-8-sig", errors="surrogateescape"), newline=""))
    header = next(reader, [])
    _delimiter_problem(path, header)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problems.append((reader.line_num, f"CSV error: {e}"))
            continue
        if not any(f.strip() for f in fields):
            continue
        try:
            "".join(fields).encode("utf-8")
        except UnicodeEncodeError:
            problems.append((reader.line_num, "not UTF-8"))
            continue
        if len(fields) != len(header):
            problems.append((reader.line_num, f"{len(fields)} fields, the header has {len(header)}"))
            continue
        rows.append((reader.line_num, dict(zip(header, fields))))
    return rows, problems


def _manifest(path: Path, split: str, text_column: str, audio_column: str) -> list[Record]:
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    rows, problems = _read_rows(path)
    if not rows:
        first = f" ({len(problems)} unreadable lines, first: line {problems[0][0]}: {problems[0][1]})" if problems else ""
        raise DataError(f"manifest {path} has no readable rows{first}")
    columns = {k: None for _, r in rows[:100] for k in r}  # JSONL rows may differ in their keys
    text_col = pick_column(columns, text_column, TEXT_COLUMNS, "text", path)
    audio_col = pick_column(columns, audio_column, AUDIO_COLUMNS, "audio", path)
    if "split" in columns:
        wanted = {SPLIT_SYNONYMS.get(s, s) for s in _parts(split)}
        rows = [(n, r) for n, r in rows if SPLIT_SYNONYMS.get(str(r.get("split")), str(r.get("split"))) in wanted]
        if not rows:
            raise DataError(f"manifest {path} has no rows with split {split!r}")
    records, seen = [], Counter()
    for n, r in rows:
        audio = r.get(audio_col)
        if isinstance(audio, dict):  # {"path": ...} as Hub-style JSONL writes it
            audio = audio.get("path")
        if audio in (None, ""):
            problems.append((n, f"no {audio_col}"))
            continue
        audio = str(audio)
        seen[audio] += 1
        text = r.get(text_col)
        records.append(Record(id=audio if seen[audio] == 1 else f"{audio}#{n}", path=str(path.parent / audio),
                              text="" if text is None else str(text), duration=_seconds(r.get("duration"))))
    return _with_problems(records, sorted(problems), path)


def _split_manifest(folder: Path, split: str) -> Path | None:
    """`<split>.csv/.tsv/.jsonl` in folder, or an audiofolder's `<split>/metadata.*`."""
    for name in split_names(split):
        for candidate in [folder / f"{name}{s}" for s in MANIFEST_SUFFIXES] + [_metadata(folder / name)]:
            if candidate is not None and candidate.is_file():
                return candidate
    if _metadata(folder):  # an audiofolder without split subfolders: one metadata file (maybe a split column)
        return _metadata(folder)
    return None


def _metadata(folder: Path) -> Path | None:
    return next((folder / f"metadata{s}" for s in (".csv", ".jsonl", ".tsv") if (folder / f"metadata{s}").is_file()),
                None)


# ---------------------------------------------------------------------------------------------
# Mixtures: several sources, each with an optional weight

MIXTURE_KEYS = ("name", "weight", "label", "train_split", "eval_split", "text_column", "audio_column",
                "dataset_config", "dataset_revision")


def read_mixture(dataset_name: Any) -> list[dict[str, Any]] | None:
    """The sources of a mixture, or None for a single source.

    A mixture is a list (of source names, or of mappings with the keys in MIXTURE_KEYS), given
    directly or as a .yaml file holding the list (or `sources: [...]`); relative folder and file
    names in the file are relative to the file.
    """
    base = None
    if isinstance(dataset_name, (str, Path)):
        path = Path(dataset_name).expanduser()
        if path.suffix.lower() not in (".yaml", ".yml"):
            return None
        if not path.is_file():
            raise DataError(f"mixture file {path} does not exist")
        import yaml
        try:
            dataset_name = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise DataError(f"mixture file {path} is not valid YAML: {e}") from None
        if isinstance(dataset_name, dict) and "sources" in dataset_name:
            dataset_name = dataset_name["sources"]
        base = path.parent
    if not isinstance(dataset_name, (list, tuple)) or not dataset_name:
        raise DataError("a mixture must list its sources: a list of names, or of mappings with keys "
                        + ", ".join(MIXTURE_KEYS))
    sources = []
    for i, item in enumerate(dataset_name):
        spec = {"name": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
        if spec is None or not spec.get("name"):
            raise DataError(f"mixture source {i + 1} must be a name or a mapping with a name, not {item!r}")
        unknown = [k for k in spec if k not in MIXTURE_KEYS]
        if unknown:
            raise DataError(f"mixture source {spec['name']!r}: unknown keys {', '.join(map(str, unknown))}; "
                            f"allowed: {', '.join(MIXTURE_KEYS)}")
        weight = spec.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0):
            raise DataError(f"mixture source {spec['name']!r}: weight must be a number >= 0, not {weight!r}")
        name = str(spec["name"])
        if base is not None and (base / name).exists():
            name = str(base / name)
        spec["name"] = name
        spec.setdefault("label", Path(name).stem if Path(name).exists() else name)
        sources.append(spec)
    labels = Counter(s["label"] for s in sources)
    for i, s in enumerate(sources):
        if labels[s["label"]] > 1:
            s["label"] = f"{s['label']}-{i + 1}"
    if all(s.get("weight") is not None for s in sources) and not sum(s["weight"] for s in sources):
        raise DataError("mixture weights are all 0: at least one source must have a positive weight")
    return sources


def mix(parts: list[tuple[str, list[Record]]], weights: list[float | None],
        seed: int) -> tuple[list[Record], list[int]]:
    """One epoch of a mixture (ids prefixed by each source's label), and how many samples each source gives it.

    Without weights every record is used once. With weights, source i gives round(w_i / sum(w) * N)
    samples to each epoch of N (the total record count): whole repeats of its records, then a seeded
    random subset of them for the remainder. The TrainBatches shuffle then spreads them over the epoch.
    """
    sizes = [len(r) for _, r in parts]
    if all(w is None for w in weights):
        counts = sizes
    else:
        ws = [1.0 if w is None else float(w) for w in weights]
        counts = [round(w / sum(ws) * sum(sizes)) if n else 0 for w, n in zip(ws, sizes)]
    mixed = []
    rng = np.random.default_rng(seed)
    for (label, records), count in zip(parts, counts):
        mixed += draw(records, count, rng, label)
    return mixed, counts


def draw(records: list[Record], count: int, rng, label: str) -> list[Record]:
    """`count` samples of `records` for one epoch, ids prefixed by `label`: whole repeats of them, then a seeded
    random subset for the remainder."""
    n = len(records)
    repeats, rest = divmod(count, n) if n else (0, 0)
    chosen = list(range(n)) * repeats + (sorted(rng.choice(n, size=rest, replace=False).tolist()) if rest else [])
    renamed = {i: dataclasses.replace(records[i], id=f"{label}/{records[i].id}") for i in set(chosen)}
    return [renamed[i] for i in chosen]
