"""Every data source users bring: Common Voice folders of each vintage and layout, manifests, audiofolders,
local Hub (parquet) datasets, mixtures; the checks before training; log-mel features equal to Whisper's."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import BAD, CV_AS, CV_EN
from whisper_ft.data import BAD_LINE, Bad, DataError, LogMel, Prepare, RecordDataset, TrainBatches, decode_audio
from whisper_ft.languages import resolve
from whisper_ft.sources import load_records, mix, read_mixture

EN_1_8 = ["the cat sat down", "open the red door", "the dog can run", "i see a blue ball", "we go home now",
          "my cat is big", "the red ball is little", "open the door now"]
OLD_HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccent"  # the first releases' columns


@pytest.fixture(scope="module")
def prepare(tiny_model):
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model)
    return Prepare(processor.feature_extractor, processor.tokenizer)


def reasons(prepare, records):
    return Counter(o.reason if isinstance(o, Bad) else "ok" for o in map(prepare, records))


def clip(n):
    return CV_EN / "clips" / f"common_voice_en_{n:06d}.mp3"


# ---------------------------------------------------------------------------------------------
# Common Voice release folders


def test_common_voice_modern_layout_splits_quotes_and_durations():
    split_sizes = {s: len(load_records(str(CV_EN), s)) for s in ("train", "dev", "validation", "test", "validated")}
    assert split_sizes == {"train": 25, "dev": 8, "validation": 8, "test": 8, "validated": 33}
    train = load_records(str(CV_EN), "train")
    assert [r.text for r in train[:8]] == EN_1_8
    assert train[-1].text == 'say "hello" to me'  # unbalanced-looking quotes kept literally (quoting off)
    assert train[0].id == "common_voice_en_000001.mp3" and train[0].path == str(clip(1))
    assert train[0].duration == 1.692  # from clip_durations.tsv, without decoding
    assert [r.id for r in load_records(str(CV_EN), "train+dev")] == [r.id for r in train] + [
        f"common_voice_en_{n:06d}.mp3" for n in range(25, 33)]
    with pytest.raises(DataError, match=r"split 'other' not found .*splits there: dev, test, train, validated"):
        load_records(str(CV_EN), "other")


def test_common_voice_old_layout_with_accent_column():
    train, dev = load_records(str(CV_AS), "train"), load_records(str(CV_AS), "validation")
    assert [r.text for r in train] == ["মই ভাত খাওঁ", "আজি বৰষুণ দিছে", "তুমি কেনে আছা", "এইটো মোৰ ঘৰ"]
    assert [r.id for r in dev] == ["common_voice_as_000005.mp3", "common_voice_as_000006.mp3"]
    assert all(r.duration is None for r in train)  # no clip_durations.tsv in this vintage


def old_release(root: Path) -> Path:
    """The oldest TSV vintage (no locale/segment/sentence_id), with validated and other splits."""
    (root / "clips").mkdir(parents=True)
    for n in (1, 2, 3, 4, 5):
        shutil.copy(clip(n), root / "clips")
    rows = [f"c{n}\tcommon_voice_en_{n:06d}.mp3\t{EN_1_8[n - 1]}\t2\t0\t\t\t" for n in (1, 2, 3, 4, 5)]
    (root / "train.tsv").write_text("\n".join([OLD_HEADER] + rows[:3]) + "\n", encoding="utf-8")
    (root / "dev.tsv").write_text("\n".join([OLD_HEADER] + rows[3:4]) + "\n", encoding="utf-8")
    (root / "validated.tsv").write_text("\n".join([OLD_HEADER] + rows[:4]) + "\n", encoding="utf-8")
    (root / "other.tsv").write_text("\n".join([OLD_HEADER] + rows[4:]) + "\r\n", encoding="utf-8")  # CRLF too
    return root


def test_common_voice_oldest_vintage_validated_and_other_on_request(tmp_path, prepare):
    folder = old_release(tmp_path / "en")
    assert [len(load_records(str(folder), s)) for s in ("train", "dev", "validated", "other", "validated+other")] \
        == [3, 1, 4, 1, 5]
    other = load_records(str(folder), "other")
    assert other[0].text == "we go home now" and other[0].id == "common_voice_en_000005.mp3"
    assert reasons(prepare, load_records(str(folder), "validated+other")) == {"ok": 5}


def test_cv_corpus_root_with_lang_choosing_the_locale(tmp_path):
    root = tmp_path / "cv-corpus-20.0-2025-01-01"
    root.mkdir()
    os.symlink(CV_AS, root / "as")
    os.symlink(CV_EN, root / "sv-SE")  # a locale whose folder name is not the Whisper code
    assert len(load_records(str(root), "train", lang=resolve("as"))) == 4
    assert len(load_records(str(root), "train", lang=resolve("asm"))) == 4
    assert len(load_records(str(root), "train", lang=resolve("assamese"))) == 4
    assert len(load_records(str(root), "train", lang=resolve("sv"))) == 25
    assert len(load_records(str(root), "dev", lang=resolve("sv-SE"))) == 8
    # the folder the tarball was extracted into works too
    assert len(load_records(str(tmp_path), "train", lang=resolve("as"))) == 4
    with pytest.raises(DataError, match=r"holds Common Voice locales as, sv-SE, none for lang 'fr' \(french"):
        load_records(str(root), "train", lang=resolve("fr"))
    with pytest.raises(DataError, match=r"holds Common Voice locales \(as, sv-SE\); set lang"):
        load_records(str(root), "train", lang=None)
    other = tmp_path / "cv-corpus-19.0-2024-09-01"
    other.mkdir()
    os.symlink(CV_AS, other / "as")
    with pytest.raises(DataError, match="several Common Voice folders for lang 'as'"):
        load_records(str(tmp_path), "train", lang=resolve("as"))


def test_clip_durations_drop_long_clips_without_decoding(tmp_path, prepare):
    folder = old_release(tmp_path / "en")
    (folder / "clip_durations.tsv").write_text(
        "clip\tduration[ms]\ncommon_voice_en_000001.mp3\t35000\ncommon_voice_en_000002.mp3\t1620\n", encoding="utf-8")
    (folder / "clips" / "common_voice_en_000001.mp3").write_bytes(b"not audio")  # never read
    train = load_records(str(folder), "train")
    assert [r.duration for r in train] == [35.0, 1.62, None]
    out = [prepare(r) for r in train]
    assert isinstance(out[0], Bad) and (out[0].reason, out[0].detail) == ("audio over 30 s", "35.0 s")
    assert not isinstance(out[1], Bad) and not isinstance(out[2], Bad)


def test_undecodable_tsv_lines_are_counted_not_fatal(tmp_path, prepare):
    folder = old_release(tmp_path / "en")
    lines = (folder / "train.tsv").read_bytes().splitlines()
    broken = [lines[0], lines[1], b"c9\tcommon_voice_en_000004.mp3\ttoo\tmany\tfields\t2\t0\t\t\t",
              b"c9\tcommon_voice_en_000005.mp3\tbad \xff\xfe bytes\t2\t0\t\t\t", lines[2], b"", lines[3]]
    (folder / "train.tsv").write_bytes(b"\n".join(broken) + b"\n")
    train = load_records(str(folder), "train")
    assert [r.id for r in train] == ["common_voice_en_000001.mp3", "common_voice_en_000002.mp3",
                                     "common_voice_en_000003.mp3", "train.tsv:3", "train.tsv:4"]
    assert [r.problem for r in train[3:]] == ["10 fields, the header has 8", "not UTF-8"]
    assert reasons(prepare, train) == {"ok": 3, BAD_LINE: 2}


# ---------------------------------------------------------------------------------------------
# Manifests, audiofolders, folders of split manifests


def test_csv_manifest_reads_every_row_with_unique_ids():
    records = load_records(str(BAD / "manifest.csv"), "train")
    assert len(records) == 21 and len({r.id for r in records}) == 21
    assert records[0].path == str(BAD / "good" / "common_voice_en_000001.mp3")
    assert [r.text for r in records if r.id in ("empty_text.mp3", "blank_text.mp3")] == ["", "   "]


def test_tsv_jsonl_json_manifests_with_column_detection_and_split_column(tmp_path, prepare):
    (tmp_path / "a.tsv").write_text(f"file_name\tnormalized_text\tsplit\n{clip(1)}\tsay \"hi\ttrain\n"
                                    f"{clip(2)}\t{EN_1_8[1]}\tvalidation\n{clip(3)}\t{EN_1_8[2]}\ttest\n")
    tsv = load_records(str(tmp_path / "a.tsv"), "train")
    assert [(r.path, r.text) for r in tsv] == [(str(clip(1)), 'say "hi')]
    assert [r.text for r in load_records(str(tmp_path / "a.tsv"), "dev")] == [EN_1_8[1]]
    assert [r.text for r in load_records(str(tmp_path / "a.tsv"), "train+test")] == ['say "hi', EN_1_8[2]]
    rows = [{"audio": {"path": f"../{CV_EN.name}/clips/{clip(1).name}"}, "text": EN_1_8[0], "duration": 1.692},
            {"audio": str(clip(2)), "text": None}, {"text": "no audio"}]
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{not json\n", encoding="utf-8")
    jsonl = load_records(str(tmp_path / "b.jsonl"), "train")
    assert [(r.text, r.duration, r.problem) for r in jsonl] == [
        (EN_1_8[0], 1.692, ""), ("", None, ""), ("", None, "no audio"),
        ("", None, "not JSON: Expecting property name enclosed in double quotes")]
    assert jsonl[0].path == str(tmp_path / ".." / CV_EN.name / "clips" / clip(1).name)
    assert reasons(prepare, jsonl) == {"missing file": 1, "empty transcript": 1, BAD_LINE: 2}
    (tmp_path / "c.json").write_text(json.dumps([{"path": str(clip(4)), "transcription": EN_1_8[3]}]))
    assert [r.text for r in load_records(str(tmp_path / "c.json"), "train")] == [EN_1_8[3]]
    # a CSV written by Excel: a byte-order mark, and the columns named explicitly
    (tmp_path / "d.csv").write_bytes("\ufeffwav,words\n".encode() + f"{clip(5)},{EN_1_8[4]}\n".encode())
    assert [r.text for r in load_records(str(tmp_path / "d.csv"), "train", text_column="words",
                                         audio_column="wav")] == [EN_1_8[4]]
    with pytest.raises(DataError, match=r"no text column in .*d.csv \(looked for sentence, text.*\); set text_column "
                                        r"to one of: wav, words"):
        load_records(str(tmp_path / "d.csv"), "train")
    with pytest.raises(DataError, match="text column 'txt' not in"):
        load_records(str(tmp_path / "d.csv"), "train", text_column="txt", audio_column="wav")


def test_csv_lines_with_wrong_field_counts_or_bytes(tmp_path, prepare):
    (tmp_path / "m.csv").write_bytes(f"path,text\n{clip(1)},{EN_1_8[0]}\n{clip(2)},a,b\n".encode()
                                     + f"{clip(3)},bad \xff\n".encode("latin-1") + f"{clip(4)},\"a, b\"\n".encode())
    records = load_records(str(tmp_path / "m.csv"), "train")
    assert [(r.id, r.text) for r in records[:2]] == [(str(clip(1)), EN_1_8[0]), (str(clip(4)), "a, b")]
    assert [(r.id, r.problem) for r in records[2:]] == [("m.csv:3", "3 fields, the header has 2"),
                                                        ("m.csv:4", "not UTF-8")]


def audiofolder(root: Path, names: list[int], extra: str = "") -> Path:
    root.mkdir(parents=True)
    lines = ["file_name,transcription" + extra]
    for n in names:
        shutil.copy(clip(n), root / clip(n).name)
        lines.append(f"{clip(n).name},{EN_1_8[(n - 1) % 8]}" + ("," + ("train" if n < 4 else "test") if extra else ""))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_audiofolder_with_metadata_csv(tmp_path, prepare):
    flat = audiofolder(tmp_path / "flat", [1, 2, 3])
    records = load_records(str(flat), "train")
    assert [(r.id, r.text) for r in records] == [(clip(n).name, EN_1_8[n - 1]) for n in (1, 2, 3)]
    assert reasons(prepare, records) == {"ok": 3}
    with_split = audiofolder(tmp_path / "split_col", [1, 2, 3, 4, 5], extra=",split")
    assert [len(load_records(str(with_split), s)) for s in ("train", "test")] == [3, 2]
    nested = tmp_path / "nested"  # Hugging Face's audiofolder layout: one folder per split
    audiofolder(nested / "train", [1, 2, 3])
    audiofolder(nested / "validation", [4])
    assert [len(load_records(str(nested), s)) for s in ("train", "dev", "train+validation")] == [3, 1, 4]
    with pytest.raises(DataError, match=r"split 'test' not found in .*nested: no test.csv"):
        load_records(str(nested), "test")


def test_folder_of_split_manifests(tmp_path):
    (tmp_path / "train.csv").write_text(f"path,text\n{clip(1)},{EN_1_8[0]}\n{clip(2)},{EN_1_8[1]}\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"path": str(clip(3)), "sentence": EN_1_8[2]}) + "\n")
    assert [len(load_records(str(tmp_path), s)) for s in ("train", "validation", "train+dev")] == [2, 1, 3]
    with pytest.raises(DataError, match="split 'test' not found"):
        load_records(str(tmp_path), "test")


def test_split_manifests_beside_a_clips_folder_are_not_common_voice(tmp_path):
    """train.csv, dev.csv and clips/: the most natural layout, once taken for a Common Voice release."""
    (tmp_path / "clips").mkdir()
    for n in (1, 2, 3):
        shutil.copy(clip(n), tmp_path / "clips" / clip(n).name)
    (tmp_path / "train.csv").write_text(f"path,text\nclips/{clip(1).name},{EN_1_8[0]}\nclips/{clip(2).name},{EN_1_8[1]}\n")
    (tmp_path / "dev.csv").write_text(f"path,text\nclips/{clip(3).name},{EN_1_8[2]}\n")
    records = load_records(str(tmp_path), "train", lang=resolve("en"))
    assert [(Path(r.path), r.text) for r in records] == [(tmp_path / "clips" / clip(n).name, EN_1_8[n - 1]) for n in (1, 2)]
    assert [r.text for r in load_records(str(tmp_path), "validation", lang=resolve("en"))] == [EN_1_8[2]]


def test_audiofolder_with_its_clips_in_a_clips_folder(tmp_path, prepare):
    (tmp_path / "clips").mkdir()
    lines = ["file_name,transcription"]
    for n in (1, 2, 3):
        shutil.copy(clip(n), tmp_path / "clips" / clip(n).name)
        lines.append(f"clips/{clip(n).name},{EN_1_8[n - 1]}")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    records = load_records(str(tmp_path), "train", lang=resolve("en"))
    assert [r.text for r in records] == EN_1_8[:3] and reasons(prepare, records) == {"ok": 3}


def test_common_voice_is_recognised_by_its_tsvs(tmp_path):
    release = tmp_path / "cv-corpus-1" / "en"
    shutil.copytree(CV_EN, release)
    assert len(load_records(str(release), "train")) == 25  # clips/ + train.tsv: Common Voice
    assert len(load_records(str(tmp_path), "train", lang=resolve("en"))) == 25  # its locale found under cv-corpus-*
    (release / "train.tsv").rename(release / "renamed.txt")
    for name in ("dev.tsv", "test.tsv", "validated.tsv", "clip_durations.tsv"):
        (release / name).unlink()
    with pytest.raises(DataError, match="not a Common Voice release"):  # clips/ alone is not enough
        load_records(str(release), "train")


def test_duplicate_rows_and_train_eval_overlap_are_warned_about(tmp_path, prepare):
    from whisper_ft.batches import load_data

    (tmp_path / "train.csv").write_text(f"path,text\n{clip(1)},{EN_1_8[0]}\n{clip(1)},{EN_1_8[0]}\n"
                                        f"{clip(1)},another transcript\n{clip(2)},{EN_1_8[1]}\n")
    (tmp_path / "dev.csv").write_text(f"path,text\n{clip(2)},{EN_1_8[1]}\n{clip(3)},{EN_1_8[2]}\n"
                                      f"{clip(3)},{EN_1_8[2]}\n")
    said = []
    load_data(cfg_for(str(tmp_path)), resolve("en"), prepare, said.append)
    log = "\n".join(said)
    assert f"warning: 1 exact duplicate rows (same audio and transcript) in the training ({tmp_path} split 'train') " \
           f"data: they count twice; first: {clip(1)}#3" in log  # the third row differs in its transcript
    assert "warning: 1 exact duplicate rows (same audio and transcript) in the evaluation data" in log
    assert f"warning: 1 of 3 evaluation samples are also training samples (same audio file): their WER flatters " \
           f"the model; first: {clip(2)}" in log


def test_named_eval_sets_are_checked_against_the_training_data_too(tmp_path, prepare):
    from whisper_ft.batches import load_data, load_eval_sets

    (tmp_path / "train.csv").write_text(f"path,text\n{clip(1)},{EN_1_8[0]}\n{clip(2)},{EN_1_8[1]}\n")
    (tmp_path / "dev.csv").write_text(f"path,text\n{clip(2)},{EN_1_8[1]}\n{clip(3)},{EN_1_8[2]}\n")
    (tmp_path / "test.csv").write_text(f"path,text\n{clip(4)},{EN_1_8[3]}\n{clip(4)},{EN_1_8[3]}\n")
    cfg = cfg_for(str(tmp_path), eval_sets={"in_domain": {"split": "dev"}, "held_out": {"split": "test"}})
    said = []
    train, _ = load_data(cfg, resolve("en"), prepare, said.append)
    sets = load_eval_sets(cfg, resolve("en"), prepare, said.append, [], train)
    log = "\n".join(said)
    assert [len(sets[name]) for name in ("in_domain", "held_out")] == [2, 2]
    assert f"warning: 1 of 2 eval set 'in_domain' samples are also training samples (same audio file): their " \
           f"WER flatters the model; first: {clip(2)}" in log
    assert "warning: 1 exact duplicate rows (same audio and transcript) in the eval set 'held_out' data" in log
    assert "held_out' samples are also" not in log and "in_domain' data" not in log


def test_unknown_folder_is_a_clear_error(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="is a folder, but not a Common Voice release .* no parquet files"):
        load_records(str(tmp_path), "train", lang=resolve("en"))


# ---------------------------------------------------------------------------------------------
# Hub datasets: a local parquet copy stands in for the Hub (no network in tests)


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("hub") / "org_speech"
    (root / "data").mkdir(parents=True)
    rows = {"audio": [{"bytes": clip(n).read_bytes(), "path": clip(n).name} for n in range(1, 7)],
            "transcription": EN_1_8[:5] + [""]}
    ds = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    ds.select(range(4)).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(4, 6)).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    return root


def test_local_parquet_dataset_like_the_hub(parquet_dataset, prepare, tmp_path):
    kw = dict(cache_dir=str(tmp_path / "cache"))
    train = load_records(str(parquet_dataset), "train", **kw)
    assert [r.text for r in train] == EN_1_8[:4]
    assert [r.id for r in train] == [f"common_voice_en_{n:06d}.mp3#{n - 1}" for n in range(1, 5)]
    assert train[0].audio_bytes is None and train[0].fetch() == clip(1).read_bytes()  # read when decoded
    assert reasons(prepare, train) == {"ok": 4}
    assert np.array_equal(prepare(train[0])["input_features"],
                          prepare(load_records(str(CV_EN), "train")[0])["input_features"])  # bytes == file
    dev = load_records(str(parquet_dataset), "dev", **kw)  # dev -> the dataset's validation split
    assert [r.text for r in dev] == [EN_1_8[4], ""]
    assert len(load_records(str(parquet_dataset), "train+dev", **kw)) == 6
    stream = load_records(str(parquet_dataset), "train", streaming=True, **kw)
    assert [(r.id, r.text, r.audio_bytes == clip(n).read_bytes()) for n, r in zip(range(1, 5), stream)] == [
        (f"common_voice_en_{n:06d}.mp3#{n - 1}", EN_1_8[n - 1], True) for n in range(1, 5)]
    with pytest.raises(DataError, match=r"has no split 'test'.*Should be one of \['train', 'validation'\]"):
        load_records(str(parquet_dataset), "test", **kw)
    with pytest.raises(DataError, match=r"text column 'sentence' not in .*; columns: audio, transcription"):
        load_records(str(parquet_dataset), "train", text_column="sentence", **kw)


def test_load_data_streaming_gives_a_stream_and_reads_eval(parquet_dataset, prepare, tmp_path):
    from whisper_ft.hub_data import HubStream
    from whisper_ft.batches import load_data

    said = []
    cfg = cfg_for(str(parquet_dataset), streaming=True, dataset_cache=str(tmp_path / "cache"), max_eval_samples=1)
    train, evals = load_data(cfg, resolve("en"), prepare, said.append)
    assert isinstance(train, HubStream) and len(list(train)) == 4
    cfg.max_train_samples = 3
    assert [r.text for r in load_data(cfg, resolve("en"), prepare, said.append)[0]] == EN_1_8[:3]
    assert [r.text for r in evals] == [EN_1_8[4]]  # the empty transcript is screened out, max_eval_samples 1
    assert said[0] == "data: streamed training samples (train), 1 evaluation samples (dev)"


def test_script_dataset_gets_the_common_voice_message(tmp_path):
    folder = tmp_path / "common_voice_11_0"
    folder.mkdir()
    (folder / "common_voice_11_0.py").write_text("import datasets\n")
    with pytest.raises(DataError) as e:
        load_records(str(folder), "train", cache_dir=str(tmp_path / "cache"))
    assert "script-based dataset" in str(e.value) and "Mozilla Data Collective" in str(e.value)
    assert "cv-corpus-*/<locale>" in str(e.value)


def test_hub_error_messages_say_what_to_do():
    from datasets.exceptions import DatasetNotFoundError

    from whisper_ft.hub_data import _explain

    gated = DatasetNotFoundError("Dataset 'org/x' is a gated dataset on the Hub. You must be authenticated to "
                                 "access it.")
    no_token = _explain("org/x", None, "train", gated, have_token=False)
    assert "gated" in no_token and "set HF_TOKEN" in no_token and "https://huggingface.co/datasets/org/x" in no_token
    assert "accept its conditions with the account that owns the token" in _explain("org/x", None, "train", gated, True)
    missing = DatasetNotFoundError("Dataset 'org/y' doesn't exist on the Hub or cannot be accessed.")
    assert "not found on the Hub" in _explain("org/y", None, "train", missing, True)
    script = RuntimeError("Dataset scripts are no longer supported, but found common_voice_11_0.py")
    assert "Mozilla Data Collective" in _explain("mozilla-foundation/common_voice_11_0", "as", "train", script, False)
    assert "refs/convert/parquet" in _explain("google/fleurs", "as_in", "train", script, False)
    offline = ConnectionError("Couldn't reach 'org/z' on the Hub (OfflineModeIsEnabled)")
    assert "could not reach the Hub" in _explain("org/z", None, "train", offline, False)
    config = ValueError("BuilderConfig 'xx' not found. Available: ['as_in']")
    assert "has no config 'xx'; set dataset_config" in _explain("google/fleurs", "xx", "train", config, False)


# ---------------------------------------------------------------------------------------------
# Mixtures


def test_mix_weights_give_exact_shares():
    from whisper_ft.data import Record

    a, b = [Record(f"a{i}", "x") for i in range(10)], [Record(f"b{i}", "y") for i in range(4)]
    plain, counts = mix([("a", a), ("b", b)], [None, None], seed=0)
    assert counts == [10, 4] and [r.id for r in plain] == [f"a/a{i}" for i in range(10)] + [f"b/b{i}" for i in range(4)]
    weighted, counts = mix([("a", a), ("b", b)], [1, 3], seed=0)
    assert counts == [4, 10] and len(weighted) == 14  # b: its 4 records twice, plus 2 chosen by the seed
    uses = Counter(r.id for r in weighted)
    assert sum(n for i, n in uses.items() if i.startswith("a/")) == 4 and sorted(
        n for i, n in uses.items() if i.startswith("b/")) == [2, 2, 3, 3]
    assert [r.id for r in mix([("a", a), ("b", b)], [1, 3], seed=0)[0]] == [r.id for r in weighted]  # seeded
    assert mix([("a", a), ("b", b)], [1, 0], seed=0)[1] == [14, 0]
    assert a[0].id == "a0"  # the sources' records are not renamed in place


def test_mixture_file_and_its_errors(tmp_path):
    (tmp_path / "mix.yaml").write_text(f"""sources:
  - name: {CV_EN}
    weight: 3
  - name: manifest.csv
    label: clinic
    weight: 1
    eval_split: ""
""")
    shutil.copy(BAD / "manifest.csv", tmp_path / "manifest.csv")
    sources = read_mixture(str(tmp_path / "mix.yaml"))
    assert [(s["name"], s["label"], s["weight"]) for s in sources] == [
        (str(CV_EN), "cv-en", 3), (str(tmp_path / "manifest.csv"), "clinic", 1)]
    assert read_mixture(str(CV_EN)) is None
    assert [s["label"] for s in read_mixture([str(CV_EN), str(CV_EN)])] == ["cv-en-1", "cv-en-2"]
    with pytest.raises(DataError, match=r"unknown keys wieght; allowed: name, weight"):
        read_mixture([{"name": str(CV_EN), "wieght": 2}])
    with pytest.raises(DataError, match="weight must be a number >= 0"):
        read_mixture([{"name": str(CV_EN), "weight": -1}])
    joined = load_records(str(tmp_path / "mix.yaml"), "train")  # no weights: each source's split, once
    assert len(joined) == 25 + 21 and joined[0].id == "cv-en/common_voice_en_000001.mp3"
    assert joined[-1].id == "clinic/overlong_text.mp3"
    with pytest.raises(DataError, match="mixture file .*nope.yaml does not exist"):
        read_mixture(str(tmp_path / "nope.yaml"))


def cfg_for(dataset_name, **overrides):
    from whisper_ft.config import Config

    base = dict(dataset_name=dataset_name, lang="en", train_split="train", eval_split="dev", hf_token="")
    return Config(**{**base, **overrides})


def test_load_data_mixture_weights_splits_and_log(tmp_path, prepare):
    from whisper_ft.batches import load_data

    (tmp_path / "mix.yaml").write_text(f"- name: {CV_EN}\n  weight: 3\n"
                                       f"- name: {CV_AS}\n  weight: 1\n  train_split: train+dev\n  eval_split: ''\n")
    said = []
    train, evals = load_data(cfg_for(str(tmp_path / "mix.yaml")), resolve("en"), prepare, said.append)
    assert said[0] == "mixture, samples per epoch: cv-en 23 (25 records, weight 3), cv-as 8 (6 records, weight 1)"
    assert len(train) == 31
    ids = Counter(r.id.split("/")[0] for r in train)
    assert ids == {"cv-en": 23, "cv-as": 8}
    assert len(evals) == 8 and evals[0].id == "cv-en/common_voice_en_000025.mp3"  # cv-as gives no eval samples


def test_replay_adds_its_share_of_general_speech_to_each_epoch(tmp_path, prepare):
    """25 domain records and replay_fraction 0.2: 6 general samples join them (6 / 31 = 19%; cv-as has 6), from the
    replay source's own split with its own columns, the domain's records unchanged and once each."""
    from whisper_ft.batches import load_data

    said = []
    cfg = cfg_for(str(CV_EN), text_column="sentence", replay_dataset=str(CV_AS), replay_split="train+dev",
                  replay_fraction=0.2)
    train, _ = load_data(cfg, resolve("en"), prepare, said.append)
    domain, _ = load_data(cfg_for(str(CV_EN), text_column="sentence"), resolve("en"), prepare, [].append)
    assert train[:len(domain)] == domain and len(train) == 25 + 6
    assert all(r.id.startswith("replay/") for r in train[25:]) and len({r.id for r in train[25:]}) == 6
    assert said[0] == f"replay: 6 samples per epoch from {CV_AS} (6 records), 20% of 31"


# ---------------------------------------------------------------------------------------------
# Checks before training


def test_load_data_keeps_text_problems_in_training_and_drops_them_from_eval(tmp_path, prepare):
    from whisper_ft.batches import load_data

    said = []
    cfg = cfg_for(str(BAD / "manifest.csv"), eval_split="train", max_bad_sample_fraction=0.5)
    train, evals = load_data(cfg, resolve("en"), prepare, said.append)
    assert len(train) == 21 and len(evals) == 18
    assert "3 training samples are unusable and will be skipped and counted when drawn: 2 empty transcript, " \
           "1 transcript over 448 tokens" in "\n".join(said)
    assert "skipped 3 evaluation samples before starting" in "\n".join(said)
    assert any("all 18 evaluation samples are training samples too" in s for s in said)


def test_load_data_refuses_unusable_datasets(tmp_path, prepare):
    from whisper_ft.batches import load_data

    (tmp_path / "empty.csv").write_text("path,text\n" + "".join(f"{clip(n)},\n" for n in range(1, 4)))
    with pytest.raises(DataError, match=r"no usable training sample in .*empty.csv split 'train' \(3 unusable: "
                                        r"3 empty transcript"):
        load_data(cfg_for(str(tmp_path / "empty.csv"), eval_strategy="no", load_best_model_at_end=False),
                  resolve("en"), prepare, print)
    # The same rule as the loop's (stopping.bad_share_surely_over): 3 of 30 (10%) may come from a corpus
    # under 5%, 9 of 30 (30%) cannot.
    rows = [f"{clip(n % 8 + 1)},{EN_1_8[n % 8]}" for n in range(27)] + [f"{clip(1)}, "] * 3
    (tmp_path / "tenth.csv").write_text("path,text\n" + "\n".join(rows) + "\n")
    train, _ = load_data(cfg_for(str(tmp_path / "tenth.csv"), eval_strategy="no", load_best_model_at_end=False),
                         resolve("en"), prepare, print)
    assert len(train) == 30
    rows = [f"{clip(n % 8 + 1)},{EN_1_8[n % 8]}" for n in range(21)] + [f"{clip(1)}, "] * 9
    (tmp_path / "third.csv").write_text("path,text\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"9 of 30 training samples .* are unusable \(30%, over max_bad_sample_fraction "
                                        r"0.05\); commonest reason: empty transcript \(9\)"):
        load_data(cfg_for(str(tmp_path / "third.csv"), eval_strategy="no", load_best_model_at_end=False),
                  resolve("en"), prepare, print)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "moved.csv").write_text("path,text\n" + "".join(f"clips/{n}.mp3,hi\n" for n in range(5)))
    with pytest.raises(DataError, match=r"none of the 5 audio files checked .* exists \(first: .*sub/clips/0.mp3\); "
                                        r"paths in a manifest are relative to the manifest's folder"):
        load_data(cfg_for(str(tmp_path / "sub" / "moved.csv"), eval_strategy="no", load_best_model_at_end=False),
                  resolve("en"), prepare, print)


# ---------------------------------------------------------------------------------------------
# Features and workers


@pytest.mark.parametrize("seconds", [0.072, 1.0, 5.0, 29.9, 29.99, 30.0])
def test_log_mel_equals_the_feature_extractor(seconds):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    for fe in (WhisperFeatureExtractor(feature_size=80), WhisperFeatureExtractor(feature_size=128)):
        expected = fe(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        got = LogMel(fe)(audio)
        # Equal up to float32 rounding: the mel matmul runs over fewer frames than the extractor's, and
        # BLAS may sum in another order (seen with transformers 5.24: 1 ulp in a few cells of a 72-ms clip).
        assert got.shape == expected.shape and np.allclose(got, expected, rtol=0, atol=1e-6)


def test_log_mel_on_real_clips(prepare):
    for record in load_records(str(CV_EN), "train")[:3]:
        audio = decode_audio(record)
        expected = prepare.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        assert np.array_equal(prepare(record)["input_features"], expected)


def test_workers_give_the_same_samples_and_bad_ones(prepare):
    import torch

    from whisper_ft.collate import Collator

    records = load_records(str(BAD / "manifest.csv"), "train")

    def epoch(workers):
        loader = torch.utils.data.DataLoader(RecordDataset(records, prepare), collate_fn=Collator(1),
                                             batch_sampler=TrainBatches(len(records), 4, seed=3), num_workers=workers)
        it, ids, bad = iter(loader), [], []
        for _ in range(6):  # ceil(21 / 4): one epoch
            batch = next(it)
            ids += batch["ids"]
            bad += [(b.id, b.reason) for b in batch["bad"]]
        return ids, bad

    ids, bad = epoch(0)
    assert len(ids) == 12 and len(bad) == 9
    assert epoch(2) == (ids, bad)


@pytest.mark.slow
def test_train_loop_on_a_mixture_of_a_release_folder_and_a_hub_dataset(tiny_model, parquet_dataset, tmp_path):
    """End to end: a Common Voice folder and a (local) Hub dataset mixed 1:1 by a mixture file."""
    from conftest import base_config, metrics, run_train

    (tmp_path / "mix.yaml").write_text(f"- name: {CV_EN}\n  weight: 1\n- name: {parquet_dataset}\n  weight: 1\n"
                                       "  eval_split: ''\n")
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, dataset_name=str(tmp_path / "mix.yaml"), max_steps=2, save_steps=2,
                      eval_steps=2, dataset_cache=str(tmp_path / "cache"))
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixture, samples per epoch: cv-en 14 (25 records, weight 1), org_speech 14 (4 records, weight 1)" \
        in proc.stderr
    assert "data: 28 training samples (train), 8 evaluation samples (dev)" in proc.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and rows[-1]["samples_seen"] == 8
    assert [r["eval_samples"] for r in rows if "eval_loss" in r] == [8]
