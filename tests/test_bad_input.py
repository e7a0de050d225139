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


@pytest.mark.slow
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
    # evaluation's audio failures are named, like training's, once (not at every evaluation)
    named = [line for line in proc.stderr.splitlines() if line.startswith("evaluation skipped 6 unusable samples: ")]
    assert len(named) == 1 and f"{BAD / 'missing.mp3'} (missing file)" in named[0]
    assert (out / "config.json").is_file() and (out / "checkpoint-10").is_dir()


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# Messages naming the real cause; the bad-share abort decided with confidence


def test_id3_only_mp3_and_a_folder_are_named_for_what_they_are(prepare, tmp_path):
    from whisper_ft.data import Record

    frame = b"TIT2" + (6).to_bytes(4, "big") + b"\x00\x00\x00hello"
    (tmp_path / "tag_only.mp3").write_bytes(b"ID3\x03\x00\x00" + bytes([0, 0, 0, len(frame)]) + frame)
    (tmp_path / "folder.mp3").mkdir()
    (tmp_path / "zero.mp3").write_bytes(b"")
    out = {name: prepare(Record(id=name, text="the cat sat down", path=str(tmp_path / name)))
           for name in ("tag_only.mp3", "folder.mp3", "zero.mp3")}
    assert (out["tag_only.mp3"].reason, out["tag_only.mp3"].detail) == (
        "undecodable audio", "no audio frames: the file holds only an ID3 tag (26 bytes)")
    assert (out["folder.mp3"].reason, out["folder.mp3"].detail) == ("not an audio file", "is a folder, not an audio file")
    assert out["zero.mp3"].detail == "empty file (0 bytes)"
    assert all("does not exist" not in o.detail for o in out.values())


@pytest.mark.parametrize("n_bad,n_seen,threshold,stops", [
    (2, 24, 0.05, False),  # the run the issue saw stopped: 8% of 24 happens by chance in a 4% corpus
    (1, 19, 0.0, False),  # below 20 samples nothing is judged
    (1, 20, 0.0, True),  # threshold 0: any bad sample is surely over it
    (0, 10_000, 0.0, False),
    (12, 24, 0.05, True),  # half broken: stops at the first check
    (5, 40, 0.05, False),  # 12.5% of 40: not yet sure
    (9, 40, 0.05, False),  # 22.5% of 40: P = 1.3e-4 in a 5% corpus, not quite sure
    (10, 40, 0.05, True),  # 25% of 40: P = 2.1e-5
    (60, 600, 0.05, True),  # 10% of 600: sure
    (400, 10_000, 0.05, False),  # 4% of many: never
])
def test_bad_share_is_judged_with_confidence(n_bad, n_seen, threshold, stops):
    from whisper_ft.stopping import bad_share_surely_over

    assert bad_share_surely_over(n_bad, n_seen, threshold) is stops


def test_a_four_percent_corpus_is_practically_never_stopped_and_a_half_broken_one_always_is():
    """Simulated runs drawing 16 samples a step, checked after every step like the loop does."""
    import numpy as np

    from whisper_ft.stopping import bad_share_surely_over

    def stopped_at(rate, rng, steps):
        bad = seen = 0
        for _ in range(steps):
            bad, seen = bad + rng.binomial(16, rate), seen + 16
            if bad_share_surely_over(bad, seen, 0.05):
                return seen
        return None

    rng = np.random.default_rng(0)
    assert [stopped_at(0.04, rng, 300) for _ in range(300)] == [None] * 300
    half = [stopped_at(0.5, rng, 300) for _ in range(50)]
    assert all(s is not None and s <= 48 for s in half)


def old_rule_stops(seed: int, n: int, bad_rows: set[int], batch: int, steps: int) -> bool:
    """Whether the earlier rule (over 5% once 20 samples were seen) stopped this draw order."""
    order = [i for b in TrainBatches(n, batch, seed=seed).epoch_batches(0)[:steps] for i in b]
    return any(k >= 20 and sum(i in bad_rows for i in order[:k]) / k > 0.05 for k in range(batch, len(order) + 1, batch))


@pytest.mark.slow
def test_four_percent_bad_corpus_completes_with_seeds_the_old_rule_stopped(tiny_model, tmp_path):
    """46 good + 2 missing/corrupt (4.2%): for seeds whose draw order put both bad samples among the first 24,
    the old rule stopped the run in its first minute; now each run goes on and reports the two."""
    data = corpus(tmp_path / "four.csv", good=46, bad_names=["missing.mp3", "corrupt.mp3"])
    seeds = [s for s in range(500) if old_rule_stops(s, 48, {46, 47}, batch=4, steps=6)][:2]
    assert len(seeds) == 2
    for seed in seeds:
        out = tmp_path / f"run{seed}"
        cfg = base_config(tiny_model, out, dataset_name=str(data), per_device_train_batch_size=4, max_steps=6,
                          eval_strategy="no", load_best_model_at_end=False, save_steps=100, seed=seed)
        proc = run_train(cfg, tmp_path)
        assert proc.returncode == 0, (seed, proc.stderr[-3000:])
        final = metrics(out)[-1]
        assert final["bad_samples"] == 2 and final["samples_seen"] == 22
