"""Bad input never kills a run: every kind is resampled or skipped, counted by reason and reported; too much
of it stops the run with a message, after a checkpoint."""

import csv
import math
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from conftest import BAD, base_config, metrics, run_train
from whisper_ft.data import BAD_LINE, Bad, Prepare, TrainBatches
from whisper_ft.sources import load_records

GOOD = [f"good/common_voice_en_{n:06d}.mp3" for n in range(1, 11)] + ["stereo_48k.wav", "mono_8k.wav"]
EXPECTED = {  # tests/data/bad/manifest.csv: what each broken row is skipped for
    "missing.mp3": ("missing file", ""),
    "corrupt.mp3": ("undecodable audio", None),
    "truncated.mp3": ("empty or truncated audio", "0.07 s"),  # soundfile returns 72 ms of the 300 bytes, no error
    "empty.wav": ("empty or truncated audio", "0.00 s"),
    "nan.wav": ("NaN or inf in audio", ""),
    "long_35s.mp3": ("audio over 30 s", "35.1 s"),
    "empty_text.mp3": ("empty transcript", ""),
    "blank_text.mp3": ("empty transcript", ""),
    "overlong_text.mp3": ("transcript over 448 tokens", "671 tokens"),
}
BY_REASON = dict(Counter(reason for reason, _ in EXPECTED.values()))


@pytest.fixture(scope="module")
def prepare(tiny_model):
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model)
    return Prepare(processor.feature_extractor, processor.tokenizer)


def test_every_bad_kind_is_skipped_for_its_reason_and_odd_rates_are_kept(prepare):
    records = load_records(str(BAD / "manifest.csv"), "train")
    out = {r.id: prepare(r) for r in records}
    bad = {i: (o.reason, o.detail) for i, o in out.items() if isinstance(o, Bad)}
    assert sorted(i for i, o in out.items() if not isinstance(o, Bad)) == sorted(GOOD)
    assert bad.keys() == EXPECTED.keys()
    for name, (reason, detail) in EXPECTED.items():
        assert bad[name][0] == reason, name
        assert detail is None or bad[name][1] == detail, (name, bad[name])
    assert bad["corrupt.mp3"][1].startswith("unknown format or corrupt")
    for name in ("stereo_48k.wav", "mono_8k.wav"):  # downmixed and resampled to 16 kHz mono, length kept
        info = sf.info(str(BAD / name))
        assert (info.channels, info.samplerate) == ((2, 48000) if name.startswith("stereo") else (1, 8000))
        assert out[name]["seconds"] == pytest.approx(info.duration, abs=1e-3)
        assert out[name]["input_features"].shape == (80, 3000)
    # the screen before training finds exactly the ones it can know without audio
    screened = {r.id: prepare.screen(r) for r in records}
    assert {i: b.reason for i, b in screened.items() if b} == {
        "empty_text.mp3": "empty transcript", "blank_text.mp3": "empty transcript",
        "overlong_text.mp3": "transcript over 448 tokens"}


def corpus(path: Path, good: int, bad_names: list[str], malformed: int = 0) -> Path:
    """A CSV manifest in tmp: `good` rows cycling over the committed good clips, then the named bad rows."""
    texts = {row["path"]: row["text"] for row in csv.DictReader(open(BAD / "manifest.csv", encoding="utf-8"))}
    rows = [(str(BAD / GOOD[i % len(GOOD)]), texts[GOOD[i % len(GOOD)]]) for i in range(good)]
    rows += [(str(BAD / name), texts[name]) for name in bad_names]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        writer.writerows(rows)
        for _ in range(malformed):
            f.write(f"{BAD / GOOD[0]},one,field too many\n")
    return path


def test_ten_percent_broken_completes_and_reports_every_reason(tiny_model, tmp_path):
    """90 good + 10 broken (every kind, and a malformed CSV line): one epoch, all counted, training goes on."""
    data = corpus(tmp_path / "tenth.csv", good=90, bad_names=list(EXPECTED), malformed=1)
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, dataset_name=str(data), train_split="train", eval_split="train",
                      per_device_train_batch_size=10, max_steps=10, eval_steps=10, save_steps=10,
                      max_bad_sample_fraction=0.15, dataloader_num_workers=2)
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)  # training went on, step after step
    final = rows[-1]
    assert final["bad_samples_by_reason"] == {**BY_REASON, BAD_LINE: 1}
    assert final["bad_samples"] == 10 and final["samples_seen"] == 90
    assert [r["bad_samples"] for r in rows if "loss" in r][-1] == 10
    evals = [r for r in rows if "eval_loss" in r]  # eval: 4 screened out up front, 6 audio failures counted
    assert [(r["eval_samples"], r["eval_bad_samples"]) for r in evals] == [(90, 6)]
    assert "4 training samples are unusable and will be skipped and counted when drawn: 2 empty transcript" \
           in proc.stderr
    assert "skipped 10 unusable samples during training: 2 empty or truncated audio, 2 empty transcript" in proc.stderr
    assert (out / "config.json").is_file() and (out / "checkpoint-10").is_dir()


def test_half_broken_stops_with_the_reason_after_a_checkpoint(tiny_model, tmp_path):
    """20 good + 20 unreadable: the run stops at the first check (24 samples seen), names the commonest
    reason, saves checkpoint-3 and exits 1; the default max_bad_sample_fraction (0.05) applies."""
    kinds = ["missing.mp3", "corrupt.mp3", "truncated.mp3", "empty.wav", "nan.wav"]
    data = corpus(tmp_path / "half.csv", good=20, bad_names=kinds * 4)
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, dataset_name=str(data), per_device_train_batch_size=8, max_steps=20,
                      eval_strategy="no", load_best_model_at_end=False, save_steps=100)
    proc = run_train(cfg, tmp_path)
    drawn = [i for batch in TrainBatches(40, 8, seed=cfg.get("seed", 42)).epoch_batches(0)[:3] for i in batch]
    reasons = Counter(EXPECTED[kinds[(i - 20) % 5]][0] for i in drawn if i >= 20)  # rows 20.. are the broken ones
    n_bad, top = sum(reasons.values()), max(reasons.values())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"whisper-ft: {n_bad} of 24 samples seen ({100 * n_bad / 24:.0f}%) were unusable, over " \
           "max_bad_sample_fraction 0.05; commonest reason: " in proc.stderr
    assert any(f"commonest reason: {r} ({top})" in proc.stderr for r, n in reasons.items() if n == top)
    assert "A checkpoint was saved." in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoint-3" / "COMPLETE").is_file()
    assert [r["bad_samples"] for r in metrics(out) if "loss" in r] [-1] == n_bad
    assert not (out / "config.json").exists()  # no final model from a stopped run
