"""One model, every runtime whisper-ft exports for: WER on held-out clips and CPU speed, one table.

    python bench/runtimes.py --model /tmp/ft-tiny-en [--clips-from tests/data/cv-en/dev.tsv] [--threads 2]

Exports --model with `python -m whisper_ft.cli.export` to each format (ctranslate2 float32 and int8, openai
float32 and float16, ggml float16, onnx float32 and its int8 pair run by sherpa-onnx) into --work, then transcribes the clips listed in the TSV (path, sentence
columns, clips/ beside it) greedily, without timestamps, one clip at a time, with transformers and with each
runtime. WER is normalised (whisper_ft.evaluation.normalize) against the TSV's sentences; "vs transformers" is
the WER of the runtime's transcripts against transformers' own. Speed is compute seconds per minute of audio,
model loading excluded, with --threads threads everywhere; every clip is one 30-s window for all runtimes, so
short clips cost what a 30-s one does.
"""

from __future__ import annotations

import argparse
import csv
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


def export(model: Path, fmt: str, quant: str, out: Path) -> None:
    if fmt == "onnx" and quant == "int8":  # written beside the float32 pair
        return
    if out.exists():
        shutil.rmtree(out)
    subprocess.run([sys.executable, "-m", "whisper_ft.cli.export", "--model", str(model), "--format", fmt,
                    "--quantization", quant, "--output-dir", str(out)], cwd=ROOT, check=True,
                   capture_output=True)


def timed(fn, audios):
    start = time.perf_counter()
    texts = [fn(a) for a in audios]
    return texts, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--clips-from", default=str(ROOT / "tests/data/cv-en/dev.tsv"))
    p.add_argument("--work", default="/tmp/whisper-ft-runtimes", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--formats", nargs="+", default=[f for f, _ in EXPORTS], help="the export formats to run")
    args = p.parse_args()

    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from whisper_ft.evaluation import normalize
    from whisper_ft.transcription import load_audio

    torch.set_num_threads(args.threads)
    tsv = Path(args.clips_from)
    with open(tsv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    audios = [load_audio(tsv.parent / "clips" / r["path"]) for r in rows]
    refs = [r["sentence"] for r in rows]
    minutes = sum(len(a) for a in audios) / 16_000 / 60

    hf = WhisperForConditionalGeneration.from_pretrained(args.model).eval()
    processor = WhisperProcessor.from_pretrained(args.model)
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|endoftext|>")

    def hf_one(a):
        feats = processor.feature_extractor(a, sampling_rate=16_000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = hf.generate(feats, max_new_tokens=args.max_new_tokens, return_timestamps=False)
        return tok.decode(ids[0], skip_special_tokens=True).strip()

    results = {}
    results["transformers float32"] = timed(hf_one, audios)
    args.work.mkdir(parents=True, exist_ok=True)
    for fmt, quant in [e for e in EXPORTS if e[0] in args.formats]:
        out = args.work / f"{fmt}-{'float32' if fmt == 'onnx' else quant}"
        export(args.model, fmt, quant, out)
        if fmt == "ctranslate2":
            import ctranslate2

            ct2 = ctranslate2.models.Whisper(str(out), device="cpu", compute_type="default",
                                             intra_threads=args.threads)
            tok.set_prefix_tokens(predict_timestamps=False)
            prompt = tok.prefix_tokens

            def one(a, ct2=ct2, prompt=prompt):
                feats = processor.feature_extractor(a, sampling_rate=16_000, return_tensors="np").input_features
                r = ct2.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)), [prompt],
                                 beam_size=1, max_length=2 * args.max_new_tokens)
                return tok.decode([t for t in r[0].sequences_ids[0] if t < eot]).strip()
        elif fmt == "openai":
            import whisper

            om = whisper.load_model(str(out / "model.pt"), device="cpu").float()

            def one(a, om=om):
                mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(a)), om.dims.n_mels)
                return whisper.decode(om, mel, whisper.DecodingOptions(
                    language="en", without_timestamps=True, fp16=False, temperature=0.0,
                    sample_len=args.max_new_tokens)).text.strip()
        elif fmt == "onnx":
            import sherpa_onnx

            enc, dec = ("encoder.int8.onnx", "decoder.int8.onnx") if quant == "int8" else ("encoder.onnx", "decoder.onnx")
            rec = sherpa_onnx.OfflineRecognizer.from_whisper(
                encoder=str(out / enc), decoder=str(out / dec), tokens=str(out / "tokens.txt"), language="en",
                num_threads=args.threads)

            def one(a, rec=rec):
                stream = rec.create_stream()
                stream.accept_waveform(16_000, a[:480_000])
                rec.decode_stream(stream)
                return stream.result.text.strip()
        else:
            from pywhispercpp.model import Model

            gm = Model(str(out / "ggml-model.bin"), n_threads=args.threads, print_progress=False,
                       print_realtime=False, redirect_whispercpp_logs_to=None)

            def one(a, gm=gm):
                segs = gm.transcribe(a[:480_000], language="en", no_timestamps=True, single_segment=True,
                                     temperature=0.0, temperature_inc=0.0, max_tokens=args.max_new_tokens,
                                     no_context=True)
                return "".join(s.text for s in segs).strip()
        one(audios[0])  # warm-up: first-call allocations are not the runtime's speed
        results[f"{'sherpa-onnx' if fmt == 'onnx' else fmt} {quant}"] = timed(one, audios)

    import jiwer

    hf_texts = results["transformers float32"][0]
    norm_refs = [normalize(r) for r in refs]
    print(f"{len(audios)} clips, {minutes * 60:.1f} s of audio, {args.threads} threads\n")
    print("| runtime | WER % (references) | WER % vs transformers | clips identical to transformers | "
          "s per minute of audio |")
    print("|---|---|---|---|---|")
    for name, (texts, seconds) in results.items():
        wer = 100 * jiwer.wer(norm_refs, [normalize(t) for t in texts])
        agree = 100 * jiwer.wer([normalize(t) or "-" for t in hf_texts], [normalize(t) for t in texts])
        same = sum(a == b for a, b in zip(hf_texts, texts))
        print(f"| {name} | {wer:.1f} | {agree:.1f} | {same}/{len(texts)} | {seconds / minutes:.1f} |")
    print()
    for name, (texts, _) in results.items():
        print(name, texts)


if __name__ == "__main__":
    main()
