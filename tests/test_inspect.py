"""The data doctor (python -m whisper_ft.cli.inspect) on the committed corpus with faults planted at test time:
each fault is named under its reason in report.json, swapped transcripts come first with a model that learned
the clips, the plots are written and the exit codes hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import yaml

from conftest import CV_EN, ROOT

SWAPS = [("common_voice_en_000002.mp3", "common_voice_en_000005.mp3"),
         ("common_voice_en_000010.mp3", "common_voice_en_000019.mp3")]
SILENT = "silent_000007.wav"
EIGHT_K = "common_voice_en_000004_8k.wav"
COPY = "common_voice_en_000003_copy.mp3"
NEAR = "common_voice_en_000011_copy.wav"  # the same clip decoded and stored again: other bytes, same sound
DIGITS, WORDS = "common_voice_en_000012.mp3", "common_voice_en_000020.mp3"
OVERLAP = "common_voice_en_000006.mp3"  # a training clip also listed in dev


def _read(tsv: Path) -> tuple[list[str], list[list[str]]]:
    lines = tsv.read_text(encoding="utf-8").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:] if line]


def _write(tsv: Path, header: list[str], rows: list[list[str]]) -> None:
    tsv.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n", encoding="utf-8")


def plant_faults(tmp: Path) -> Path:
    """A copy of tests/data/cv-en with one of each fault (see the constants above); returns its folder."""
    cv = tmp / "cv"
    shutil.copytree(CV_EN, cv)
    header, rows = _read(cv / "train.tsv")
    col, path = header.index("sentence"), header.index("path")
    by_path = {r[path]: r for r in rows}
    for a, b in SWAPS:
        by_path[a][col], by_path[b][col] = by_path[b][col], by_path[a][col]
    assert by_path[DIGITS][col] == by_path[WORDS][col] == "i see a blue ball"
    by_path[DIGITS][col], by_path[WORDS][col] = "i see 1 blue ball", "i see one blue ball"
    sf.write(cv / "clips" / SILENT, np.zeros(24_000, np.float32), 16_000, subtype="PCM_16")
    by_path["common_voice_en_000007.mp3"][path] = SILENT
    audio, rate = sf.read(cv / "clips" / "common_voice_en_000004.mp3", dtype="float32")
    assert rate == 16_000
    sf.write(cv / "clips" / EIGHT_K, soxr.resample(audio, 16_000, 8_000), 8_000, subtype="PCM_16")
    by_path["common_voice_en_000004.mp3"][path] = EIGHT_K
    shutil.copyfile(cv / "clips" / "common_voice_en_000003.mp3", cv / "clips" / COPY)
    rows.append([*by_path["common_voice_en_000003.mp3"]])
    rows[-1][path] = COPY
    audio, _ = sf.read(cv / "clips" / "common_voice_en_000011.mp3", dtype="float32")
    sf.write(cv / "clips" / NEAR, audio, 16_000, subtype="PCM_16")
    rows.append([*by_path["common_voice_en_000011.mp3"]])
    rows[-1][path] = NEAR
    _write(cv / "train.tsv", header, rows)
    dev_header, dev = _read(cv / "dev.tsv")
    _write(cv / "dev.tsv", dev_header, dev + [by_path[OVERLAP]])
    return cv


def inspect(tmp: Path, model: Path, data: Path, *args: str, **overrides) -> tuple[int, dict, Path]:
    from whisper_ft.cli.inspect import main

    cfg = {"lang": "en", "whisper_pretrained": str(model), "checkpoint_dir": str(tmp / "run"),
           "dataset_name": str(data), "train_split": "train", "eval_split": "dev", "per_device_eval_batch_size": 8,
           "dataloader_num_workers": 0, "fp16": False, "bf16": False, "report_to": "none", **overrides}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out = tmp / "report"
    code = main(["--config", str(path), "--output-dir", str(out), *args])
    return code, json.loads((out / "report.json").read_text(encoding="utf-8")), out


def flagged(report: dict, reason: str) -> set[str]:
    return set(report["findings"].get(reason, {}).get("samples", []))


@pytest.mark.slow
def test_each_planted_fault_is_named_under_its_reason(tiny_model_en, tmp_path):
    code, report, out = inspect(tmp_path, tiny_model_en, plant_faults(tmp_path))
    assert code == 0 and report["verdict"] == {"usable": True, "exit_code": 0, "reasons": []}
    assert flagged(report, "near-silent audio") == {f"train/{SILENT}"}
    assert flagged(report, "low sample rate") == {f"train/{EIGHT_K}"}
    assert flagged(report, "duplicate") == {f"train/{COPY}"}
    assert flagged(report, "near duplicate") == {f"train/{NEAR}"}
    assert flagged(report, "digits/words mix") == {f"train/{DIGITS}", f"train/{WORDS}"}
    assert flagged(report, "train/eval overlap (audio)") == {f"eval/{OVERLAP}"}
    # every dev sentence is a training sentence too (one sentence list, several voices): reported, not listed
    assert len(flagged(report, "train/eval overlap (text)")) == 8
    listed = {(x["split"], x["id"]) for x in report["suspicious_samples"]}
    assert ("eval", "common_voice_en_000025.mp3") not in listed
    assert ("train", SILENT) in listed and ("eval", OVERLAP) in listed
    train = report["splits"]["train"]
    assert (train["samples"], train["skipped"]) == (27, 0)
    assert train["sample_rates"] == {"16000": 26, "8000": 1}
    assert sum(train["duration_histogram"].values()) == 27 and train["duration_histogram"]["1-2 s"] == 27
    assert report["cost"]["steps_per_epoch_one_gpu"] == 1  # 27 samples, batch 32
    for name in ("durations.png", "speaking_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (out / "report.md").read_text(encoding="utf-8")
    assert not (out / "scores.png").exists()  # no model, no scores


@pytest.mark.slow
def test_swapped_transcripts_rank_first_with_a_model_that_learned_the_clips(learned_run, tiny_model, tmp_path):
    out_dir, proc, _ = learned_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, report, out = inspect(tmp_path, tiny_model, plant_faults(tmp_path), "--with-model", str(out_dir))
    assert code == 0
    swapped = {p for pair in SWAPS for p in pair}
    # The digits/words plant is a one-word mislabel too (the clip says "a", the transcript "1" or "one"): the
    # model rightly finds it unlikely, so it may rank among the swaps; every other sample must come after them.
    ranked = [x for x in report["suspicious_samples"] if x["id"] not in (DIGITS, WORDS)]
    first = [x["id"] for x in ranked[: len(swapped)]]
    assert set(first) == swapped, [(x["id"], x["reasons"]) for x in report["suspicious_samples"][:8]]
    top = report["suspicious_samples"][0]
    assert top["reasons"][0]["reason"] == "transcript does not match audio" and top["model_output"]
    assert set(report["model"]["wer_per_split"]) == {"train", "eval"}
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_exit_2_when_training_would_refuse_the_data(tiny_model_en, tmp_path):
    cv = tmp_path / "cv"
    shutil.copytree(CV_EN, cv)
    for clip in sorted((cv / "clips").glob("*.mp3"))[:20]:  # 20 of the 25 training clips unreadable
        clip.write_bytes(b"\0" * 100)
    code, report, _ = inspect(tmp_path, tiny_model_en, cv)
    assert code == 2 and not report["verdict"]["usable"]
    assert "max_bad_sample_fraction" in report["verdict"]["reasons"][0]
    assert report["splits"]["train"]["skipped_by_reason"] == {"undecodable audio": 20}
    # the same data with a tolerant limit: usable
    code, report, _ = inspect(tmp_path, tiny_model_en, cv, max_bad_sample_fraction=0.9)
    assert code == 0 and report["verdict"]["usable"]


@pytest.mark.slow
def test_exit_2_when_load_data_refuses(tiny_model_en, tmp_path):
    cv = tmp_path / "cv"
    shutil.copytree(CV_EN, cv)
    header, rows = _read(cv / "train.tsv")
    text = header.index("sentence")
    for r in rows:
        r[text] = " "
    _write(cv / "train.tsv", header, rows)
    code, report, _ = inspect(tmp_path, tiny_model_en, cv)
    assert code == 2
    assert report["verdict"]["reasons"][0].startswith("no usable training sample")
    assert report["splits"]["train"]["skipped_by_reason"] == {"empty transcript": 25}


def test_a_wrong_config_exits_2_and_a_model_that_will_not_load_exits_1(tmp_path, capsys):
    from whisper_ft.cli.inspect import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"lang": "en", "dataset_name": str(CV_EN)}), encoding="utf-8")
    assert main(["--config", str(path), "--no-such-option"]) == 2
    assert "unknown option --no-such-option" in capsys.readouterr().err
    assert main(["--config", str(path), "--with-model", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "could not load Whisper" in err and "Traceback" not in err
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------------------------------------
# The pieces


def test_audio_facts_tell_silence_clipping_and_little_speech_apart():
    from whisper_ft.doctor.audio import audio_facts, audio_reasons

    t = np.arange(48_000) / 16_000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    burst = np.zeros(48_000, np.float32)
    burst[:3_000] = tone[:3_000]  # 0.19 s of sound in 3 s
    reasons = lambda a: [r for r, _ in audio_reasons(audio_facts(a))]  # noqa: E731
    assert reasons(tone) == []
    assert reasons(np.zeros(48_000, np.float32)) == ["near-silent audio"]
    assert reasons(np.full(48_000, 1e-4, np.float32)) == ["near-silent audio"]  # -80 dBFS hum
    assert reasons(burst) == ["little speech"]
    assert reasons(np.clip(5 * tone, -1, 1)) == ["clipped audio"]  # peaks of 1.5 cut at full scale
    assert audio_facts(tone)["speech_share"] == 1.0


def test_numbers_flag_the_rarer_style():
    from whisper_ft.doctor.text import number_findings

    samples = [{"key": ("train", str(i)), "text": t} for i, t in
               enumerate(["two cats", "twenty dogs", "3 birds", "no number", "one more"])]
    found, summary = number_findings(samples, "en")
    assert set(found) == {("train", "2")}
    assert (summary["with_digits"], summary["with_number_words"]) == (1, 3)
    assert number_findings(samples[:3], "fr")[0] == {}  # no French number words known: digits alone are no mix


def test_percentile_ranks_share_ties():
    from whisper_ft.doctor.ranking import percentile_ranks

    assert percentile_ranks([3.0, 1.0, 2.0, 2.0]) == [1.0, 0.0, 0.5, 0.5]


def test_cost_uses_the_measured_row_for_measured_settings():
    from whisper_ft.config import Config
    from whisper_ft.doctor.cost import MEASURED, estimate

    cfg = Config(model_name="whisper-small", whisper_pretrained="openai/whisper-small", bf16=True, fp16=False,
                 per_device_train_batch_size=32, gradient_accumulation_steps=2, gradient_checkpointing="false",
                 max_steps=100)
    e = estimate(cfg, 1000, 1.0)
    assert e["steps_per_epoch_one_gpu"] == 16  # ceil(1000 / 64)
    assert e["estimate"]["same_settings_as_measured"] and e["estimate"]["peak_gib"] == 22.4
    assert e["estimate"]["minutes_per_epoch"] == pytest.approx(1000 / 245.3 / 60, abs=0.01)
    bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    for row in MEASURED:  # the figures are bench/README.md's own
        assert f"{row[5]}" in bench and f"{row[6]}" in bench, row
