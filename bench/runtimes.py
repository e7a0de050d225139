"""One model, every runtime whisper-ft exports for: WER on held-out clips and CPU speed, one table.

    python bench/runtimes.py --model /tmp/ft-tiny-en [--data tests/data/cv-en] [--split dev] [--threads 2]
    python bench/runtimes.py --model RUN --data CORPUS --split heldout+unseen+general --max-clips 40

Exports --model with `python -m whisper_ft.cli.export` to each format (ctranslate2 float32 and int8, openai
float32 and float16, ggml float16, onnx float32 and its int8 pair) into --work, then transcribes the clips of
--data's --split (read as training reads them: a Common Voice folder, <split>.csv/.tsv/.jsonl manifests,
"a+b" joins splits; the first --max-clips of each split) greedily, without timestamps, one clip at a time,
with transformers and with each runtime as a user would call it: faster-whisper's WhisperModel.transcribe,
openai-whisper's whisper.decode, pywhispercpp's Model.transcribe, sherpa-onnx's OfflineRecognizer.
WER is normalised (whisper_ft.evaluation.normalize) against the references, per split and over all;
"vs transformers" is the WER of the runtime's transcripts against transformers' own, and "identical" counts
the clips whose text is character for character transformers'. Speed is seconds of compute per minute of
audio (feature extraction and decoding; model loading and a warm-up clip excluded), with --threads
threads everywhere; every clip is one 30-s window for all runtimes, so short clips cost what a 30-s one does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPORTS = [("ctranslate2", "float32"), ("ctranslate2", "int8"), ("openai", "float32"), ("openai", "float16"),
           ("ggml", "float16"), ("onnx", "float32"), ("onnx", "int8")]
RUNTIME = {"ctranslate2": "faster-whisper", "openai": "openai-whisper", "ggml": "whisper.cpp", "onnx": "sherpa-onnx"}
WINDOW = 30 * 16_000


def export(model: Path, fmt: str, quant: str, out: Path) -> None:
    if fmt == "onnx" and quant == "int8":  # written beside the float32 pair
        return
    if out.exists():
        shutil.rmtree(out)
    proc = subprocess.run([sys.executable, "-m", "whisper_ft.cli.export", "--model", str(model), "--format", fmt,
                           "--quantization", quant, "--output-dir", str(out)], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"exporting {fmt} {quant} failed:\n{proc.stderr[-2000:]}")


def load_clips(data: str, split: str, max_clips: int):
    """(split, audio, reference) of the first max_clips clips of each split in `split` ("a+b")."""
    from whisper_ft.sources import load_records
    from whisper_ft.transcription import load_audio

    clips = []
    for part in split.split("+"):
        records = load_records(data, part)[: max_clips or None]
        clips += [(part, load_audio(r.path), r.text) for r in records]
    return clips


def runtime(fmt: str, quant: str, out: Path, args, processor):
    """The transcribe function of one export in its runtime, called the way its users call it."""
    if fmt == "ctranslate2":
        from faster_whisper import WhisperModel

        fw = WhisperModel(str(out), device="cpu", compute_type="default", cpu_threads=args.threads)

        def one(a):
            # greedy, one window, no temperature fallback, no no-speech skipping: the decoding transformers does
            segments, _ = fw.transcribe(a[:WINDOW], language="en", beam_size=1, best_of=1, temperature=0.0,
                                        without_timestamps=True, condition_on_previous_text=False,
                                        no_speech_threshold=None, vad_filter=False,
                                        max_new_tokens=args.max_new_tokens)
            return "".join(s.text for s in segments).strip()
        return one
    if fmt == "openai":
        import torch
        import whisper

        om = whisper.load_model(str(out / "model.pt"), device="cpu").float()

        def one(a):
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(a)), om.dims.n_mels)
            return whisper.decode(om, mel, whisper.DecodingOptions(
                language="en", without_timestamps=True, fp16=False, temperature=0.0,
                sample_len=args.max_new_tokens)).text.strip()
        return one
    if fmt == "onnx":
        import sherpa_onnx

        enc, dec = ("encoder.int8.onnx", "decoder.int8.onnx") if quant == "int8" else ("encoder.onnx", "decoder.onnx")
        rec = sherpa_onnx.OfflineRecognizer.from_whisper(
            encoder=str(out / enc), decoder=str(out / dec), tokens=str(out / "tokens.txt"), language="en",
            num_threads=args.threads)

        def one(a):
            stream = rec.create_stream()
            stream.accept_waveform(16_000, a[:WINDOW])
            rec.decode_stream(stream)
            return stream.result.text.strip()
        return one
    from pywhispercpp.model import Model

    gm = Model(str(out / "ggml-model.bin"), n_threads=args.threads, print_progress=False, print_realtime=False,
               redirect_whispercpp_logs_to=None)

    def one(a):
        segs = gm.transcribe(a[:WINDOW], language="en", no_timestamps=True, single_segment=True, temperature=0.0,
                             temperature_inc=0.0, max_tokens=args.max_new_tokens, no_context=True)
        return "".join(s.text for s in segs).strip()
    return one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="the Whisper model folder to export")
    p.add_argument("--data", default=str(ROOT / "tests/data/cv-en"), help="dataset, as dataset_name in a config")
    p.add_argument("--split", default="dev", help="split(s) to transcribe; a+b joins splits")
    p.add_argument("--max-clips", type=int, default=0, help="the first N clips of each split (0: all)")
    p.add_argument("--work", default="/tmp/whisper-ft-runtimes", type=Path, help="where the exports are written")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--formats", nargs="+", default=list(RUNTIME), choices=list(RUNTIME),
                   help="the export formats to run")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import jiwer
    import torch
    import transformers
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from whisper_ft.evaluation import normalize

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # generate's per-call notes would bury the table
    clips = load_clips(args.data, args.split, args.max_clips)
    splits = list(dict.fromkeys(s for s, _, _ in clips))
    audios = [a.astype(np.float32) for _, a, _ in clips]
    minutes = sum(len(a) for a in audios) / 16_000 / 60

    hf = WhisperForConditionalGeneration.from_pretrained(args.model).eval()
    processor = WhisperProcessor.from_pretrained(args.model)
    tok = processor.tokenizer

    def hf_one(a):
        feats = processor.feature_extractor(a[:WINDOW], sampling_rate=16_000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = hf.generate(feats, max_new_tokens=args.max_new_tokens, return_timestamps=False)
        return tok.decode(ids[0], skip_special_tokens=True).strip()

    runners = {("transformers", "float32"): hf_one}
    args.work.mkdir(parents=True, exist_ok=True)
    for fmt, quant in [e for e in EXPORTS if e[0] in args.formats]:
        out = args.work / f"{fmt}-{'float32' if fmt == 'onnx' else quant}"
        export(args.model, fmt, quant, out)
        runners[(RUNTIME[fmt], quant)] = runtime(fmt, quant, out, args, processor)
    for one in runners.values():
        one(audios[0])  # warm-up: first-call allocations are not the runtime's speed
    # Clip after clip, every runtime in turn: load from other processes on the machine falls on all of them
    # alike instead of on whichever runtime happened to run at the time.
    texts = {key: [] for key in runners}
    seconds = dict.fromkeys(runners, 0.0)
    load_before = os.getloadavg()[0]
    for a in audios:
        for key, one in runners.items():
            start = time.perf_counter()
            texts[key].append(one(a))
            seconds[key] += time.perf_counter() - start
    results = {key: (texts[key], seconds[key]) for key in runners}

    hf_texts = results[("transformers", "float32")][0]

    def wer(refs, hyps):
        pairs = [(normalize(r), normalize(h)) for r, h in zip(refs, hyps)]
        return 100 * jiwer.wer([r or "-" for r, _ in pairs], [h for _, h in pairs])

    print(f"{len(audios)} clips ({', '.join(f'{s} {sum(c[0] == s for c in clips)}' for s in splits)}), "
          f"{minutes * 60:.1f} s of audio, {args.threads} threads, {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} before the timed pass and {os.getloadavg()[0]:.1f} after\n")
    print("| runtime | weights | " + " | ".join(f"WER % {s}" for s in splits) +
          (" | WER % all" if len(splits) > 1 else "") +
          " | WER % vs transformers | identical to transformers | s per minute of audio |")
    print("|---|---|" + "---|" * (len(splits) + (len(splits) > 1) + 3))
    for (name, quant), (texts, seconds) in results.items():
        cells = [wer([r for s, _, r in clips if s == sp], [t for (s, _, _), t in zip(clips, texts) if s == sp])
                 for sp in splits]
        if len(splits) > 1:
            cells.append(wer([r for _, _, r in clips], texts))
        same = sum(a == b for a, b in zip(hf_texts, texts))
        print(f"| {name} | {quant} | " + " | ".join(f"{c:.1f}" for c in cells) +
              f" | {wer(hf_texts, texts):.1f} | {same}/{len(texts)} | {seconds / minutes:.1f} |")
    print()
    for (name, quant), (texts, _) in results.items():
        for (sp, _, ref), hf_text, text in zip(clips, hf_texts, texts):
            if text != hf_text:
                print(f"{name} {quant} differs ({sp}): transformers {hf_text!r}, {name} {text!r}, reference {ref!r}")


if __name__ == "__main__":
    main()
