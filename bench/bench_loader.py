"""How fast the data loader turns Common Voice-like MP3 clips into training samples.

    python bench/bench_loader.py                       # 96 clips, workers 0 1 2, 2 passes each
    python bench/bench_loader.py --workers 0 1 2 4 --clips 192 --passes 3

It makes 5-s clips like Common Voice's (48 kHz mono MP3, about 64 kbit/s) in a temp folder by joining
the committed English clips, then measures:

1. the cost of each stage per clip, in this process, one thread: decode (soundfile), resample 48 ->
   16 kHz (soxr), log-mel (ours, `whisper_ft.data.LogMel`; and the transformers feature extractor for
   comparison), and the transcript's token ids;
2. samples/s of the real loader (RecordDataset + Prepare + Collator in a torch DataLoader, batch 16)
   for each worker count, with our log-mel and with the feature extractor's, after the first batch
   (worker start-up is not counted). Worker count 0 runs everything in this process.

Workers run one torch thread each, as DataLoader sets it; the main process is set to one thread too,
so the numbers measure the loader and not OpenMP spinning. Compare numbers within one run only: the
machine is shared, and timings move by 5-10% from run to run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CV_EN = ROOT / "tests" / "data" / "cv-en"


def make_clips(folder: Path, n: int, seconds: float = 5.0, rate: int = 48_000) -> list[tuple[Path, str]]:
    """n clips of `seconds` each: committed sentences joined with 0.3 s pauses, upsampled to 48 kHz, MP3."""
    import numpy as np
    import soundfile as sf
    import soxr

    from whisper_ft.sources import load_records

    source = [(r, sf.read(r.path, dtype="float32")[0]) for r in load_records(str(CV_EN), "validated")]
    pause = np.zeros(int(0.3 * 16_000), np.float32)
    clips = []
    for i in range(n):
        parts, words, length, k = [], [], 0, i
        while length < seconds * 16_000:
            record, audio = source[k % len(source)]
            parts += [audio, pause]
            words.append(record.text)
            length += len(audio) + len(pause)
            k += 7
        audio = np.concatenate(parts)[: int(seconds * 16_000)]
        path = folder / f"cv_like_{i:04d}.mp3"
        sf.write(path, soxr.resample(audio, 16_000, rate), rate, format="MP3", subtype="MPEG_LAYER_III",
                 bitrate_mode="CONSTANT", compression_level=0.86)
        clips.append((path, " ".join(words)))
    return clips


def stage_costs(records, prepare, repeats: int) -> dict[str, float]:
    """Milliseconds per clip for each stage, median over `repeats` passes."""
    import soundfile as sf
    import soxr

    from whisper_ft.data import SAMPLE_RATE

    fe = prepare.feature_extractor
    timings: dict[str, list[float]] = {k: [] for k in ("decode", "resample", "log-mel (ours)",
                                                       "log-mel (feature extractor)", "tokenize")}
    for _ in range(repeats):
        pass_times = {k: 0.0 for k in timings}
        for r in records:
            t0 = time.perf_counter()
            audio, rate = sf.read(r.path, dtype="float32", always_2d=True)
            audio = audio[:, 0]
            t1 = time.perf_counter()
            audio = soxr.resample(audio, rate, SAMPLE_RATE)
            t2 = time.perf_counter()
            prepare.log_mel(audio)
            t3 = time.perf_counter()
            fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")
            t4 = time.perf_counter()
            prepare.labels(r.text)
            t5 = time.perf_counter()
            for key, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                pass_times[key] += dt
        for key in timings:
            timings[key].append(1000 * pass_times[key] / len(records))
    return {k: statistics.median(v) for k, v in timings.items()}


def loader_rate(records, prepare, collate, workers: int, passes: int, batch: int = 16) -> float:
    """Samples/s through the real DataLoader, from the first batch on (start-up excluded)."""
    import torch

    from whisper_ft.data import RecordDataset

    loader = torch.utils.data.DataLoader(RecordDataset(records * passes, prepare), batch_size=batch,
                                         collate_fn=collate, num_workers=workers, shuffle=False,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    it = iter(loader)
    first = next(it)
    assert not first["bad"], first["bad"]
    start, n = time.perf_counter(), 0
    for b in it:
        assert not b["bad"], b["bad"]
        n += len(b["ids"])
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=96, help="5-s MP3 clips to make (default 96)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default 0 1 2)")
    p.add_argument("--passes", type=int, default=2, help="passes over the clips per loader measurement")
    p.add_argument("--gpu-rate", type=float, default=200.0, help="samples/s a GPU consumes (default 200)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import soundfile as sf
    from transformers import WhisperFeatureExtractor

    from whisper_ft import tiny
    from whisper_ft.collate import Collator
    from whisper_ft.data import Prepare, Record

    tokenizer = tiny.build_tokenizer(tiny.texts_from_tsv(CV_EN / "validated.tsv"))
    prepare = Prepare(WhisperFeatureExtractor(feature_size=80), tokenizer)
    slow = Prepare(WhisperFeatureExtractor(feature_size=80), tokenizer)
    slow.log_mel.fast = False  # the transformers feature extractor, as before
    assert prepare.log_mel.fast
    collate = Collator(tokenizer.convert_tokens_to_ids("<|startoftranscript|>"))

    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp), args.clips)
        info = sf.info(str(clips[0][0]))
        kbps = sum(c.stat().st_size for c, _ in clips) * 8 / 1000 / (len(clips) * info.duration)
        records = [Record(id=c.name, text=t, path=str(c)) for c, t in clips]
        print(f"{len(clips)} clips, {info.duration:.2f} s, {info.samplerate} Hz, {info.channels} channel, "
              f"{info.format} {info.subtype}, {kbps:.0f} kbit/s; torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread; cores: {len(__import__('os').sched_getaffinity(0))}")

        costs = stage_costs(records, prepare, repeats=3)
        ours = costs["decode"] + costs["resample"] + costs["log-mel (ours)"] + costs["tokenize"]
        before = costs["decode"] + costs["resample"] + costs["log-mel (feature extractor)"] + costs["tokenize"]
        print("\n| stage (ms per 5-s clip, one thread) | ms |\n|---|---|")
        for key, ms in costs.items():
            print(f"| {key} | {ms:.2f} |")
        print(f"| **sum, ours** (=> at most {1000 / ours:.0f} samples/s per worker) | {ours:.2f} |")
        print(f"| sum with the feature extractor (=> at most {1000 / before:.0f} samples/s) | {before:.2f} |")

        print("\n| workers | samples/s, our log-mel | samples/s, feature extractor |\n|---|---|---|")
        rates = {}
        for w in args.workers:
            rates[w] = loader_rate(records, prepare, collate, w, args.passes)
            old = loader_rate(records, slow, collate, w, args.passes)
            print(f"| {w} | {rates[w]:.0f} | {old:.0f} |", flush=True)
        per_worker = rates.get(1, rates[max(rates)] / max(1, max(rates)))
        need = math.ceil(args.gpu_rate / per_worker)
        print(f"\none worker: {per_worker:.0f} samples/s (target 40). A GPU that consumes {args.gpu_rate:.0f} "
              f"samples/s needs about {need} workers on free cores (one core each: "
              f"{args.gpu_rate:.0f} / {per_worker:.0f}, rounded up), plus headroom for the training process.")


if __name__ == "__main__":
    main()
