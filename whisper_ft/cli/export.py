"""Export a Whisper model folder for faster-whisper (CTranslate2), and check it transcribes the same.

    pip install -r requirements-export.txt          # ctranslate2, an optional extra
    python -m whisper_ft.cli.export --model checkpoints/whisper-small-as [--quantization int8_float16]
                                    [--output-dir DIR] [--verify clip1.mp3 clip2.wav ...]

The output folder holds model.bin, config.json and vocabulary.json from CTranslate2's converter, plus
the two files faster-whisper reads beside them and that exports often miss: tokenizer.json (without
it faster-whisper silently falls back to openai's tokenizer, wrong for an extended vocabulary) and
preprocessor_config.json (the log-mel size: 128 bins for large-v3, 80 for the others).
--verify transcribes the given clips (first 30 s) greedily with both the transformers model and the
export and compares the texts: with --quantization float32 they must be identical (exit 1 if not);
quantized weights may legitimately change a few words, so there a difference is only reported.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from whisper_ft.exit_codes import Exit

QUANTIZATIONS = ("float16", "float32", "bfloat16", "int8", "int8_float16", "int8_float32", "int8_bfloat16", "int16")
EXTRA_FILES = ("tokenizer.json", "preprocessor_config.json")


class ExportError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m whisper_ft.cli.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Whisper model folder (a run's checkpoint_dir) or Hub id")
    p.add_argument("--format", default="ctranslate2", choices=("ctranslate2",), help="export format")
    p.add_argument("--quantization", default="float16", choices=QUANTIZATIONS,
                   help="weight type; float16 is faster-whisper's usual choice, int8_float16 halves it again")
    p.add_argument("--output-dir", default="", help="default: <model folder>-ct2")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--verify", nargs="+", default=[], metavar="AUDIO", help="clips to transcribe with both")
    p.add_argument("--language", default="", help="language for --verify; default: the model's generation config")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per clip in --verify")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir or f"{args.model.rstrip('/')}-ct2")
    try:
        export_ctranslate2(args.model, out, args.quantization, force=args.force)
        print(f"whisper-ft export: wrote {out} ({args.quantization}); use it with\n"
              f"  from faster_whisper import WhisperModel\n"
              f"  segments, info = WhisperModel({str(out)!r}).transcribe('audio.mp3')", file=sys.stderr)
        if args.verify:
            return verify(args.model, out, [Path(f) for f in args.verify], exact=args.quantization == "float32",
                          language=args.language, max_new_tokens=args.max_new_tokens)
    except ExportError as e:
        print(f"whisper-ft export: {e}", file=sys.stderr)
        return Exit.ERROR
    return Exit.OK


def export_ctranslate2(model: str, out: Path, quantization: str, force: bool = False) -> Path:
    """Convert with CTranslate2's converter into a temporary folder, add the processor files, then rename:
    an interrupted export never leaves a half-written folder that faster-whisper would try to load."""
    try:  # an optional extra: say how to get it
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise ExportError("the ctranslate2 package is not installed: pip install -r requirements-export.txt") from None
    from transformers import WhisperProcessor

    from whisper_ft.model import ModelError, from_pretrained

    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it or choose --output-dir")
    try:
        processor = from_pretrained(WhisperProcessor, model)
    except ModelError as e:
        raise ExportError(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        TransformersConverter(model, load_as_float16=quantization == "float16").convert(
            str(tmp / "model"), quantization=quantization, force=True)
        # transformers 5 keeps the feature extractor in processor_config.json; faster-whisper reads only
        # preprocessor_config.json, so write that one from the feature extractor itself.
        processor.feature_extractor.save_pretrained(tmp / "processor")
        processor.tokenizer.save_pretrained(tmp / "processor")
        for name in EXTRA_FILES:
            if not (tmp / "processor" / name).is_file():
                raise ExportError(f"saving the processor of {model} wrote no {name}")
            shutil.copy2(tmp / "processor" / name, tmp / "model" / name)
        if out.exists():
            shutil.rmtree(out)
        (tmp / "model").rename(out)
    except ExportError:
        raise
    except Exception as e:  # the converter raises many types (unsupported architecture, bad weights, disk full)
        raise ExportError(f"converting {model} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def transcripts(model: str, exported: Path, files: list[Path], language: str = "",
                max_new_tokens: int = 128) -> tuple[list[str], list[str]]:
    """Greedy, no-timestamp transcripts of the clips (first 30 s) by transformers and by CTranslate2."""
    import ctranslate2
    import numpy as np
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from whisper_ft.languages import resolve
    from whisper_ft.model import is_multilingual
    from whisper_ft.transcription import load_audio

    processor = WhisperProcessor.from_pretrained(model)
    hf = WhisperForConditionalGeneration.from_pretrained(model).eval()
    kwargs = {}
    if is_multilingual(hf):
        code = resolve(language).code if language else hf.generation_config.language
        if not code:
            raise ExportError("the model's generation config names no language: pass --language for --verify")
        kwargs = {"language": code, "task": hf.generation_config.task or "transcribe"}
    tokenizer = processor.tokenizer
    tokenizer.set_prefix_tokens(language=kwargs.get("language"), task=kwargs.get("task"), predict_timestamps=False)
    prompt = tokenizer.prefix_tokens  # <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>
    try:
        audios = [load_audio(f) for f in files]
    except Exception as e:
        raise ExportError(f"--verify could not read its audio: {e}") from None
    features = processor.feature_extractor(audios, sampling_rate=16_000, return_tensors="np").input_features
    with torch.no_grad():
        # One call per clip and no timestamps: the same single 30-s decode that CTranslate2 does.
        inputs = torch.from_numpy(features)
        ids = hf.generate(inputs, attention_mask=torch.ones(inputs.shape[::2], dtype=torch.long),
                          max_new_tokens=max_new_tokens, return_timestamps=False, force_unique_generate_call=True,
                          **kwargs)
    ours = tokenizer.batch_decode(ids, skip_special_tokens=True)
    ct2 = ctranslate2.models.Whisper(str(exported), device="cpu", compute_type="default")
    # CTranslate2 decodes at most max_length / 2 new tokens: ask for twice as many to match.
    results = ct2.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
                           [prompt] * len(files), beam_size=1, max_length=2 * max_new_tokens)
    theirs = tokenizer.batch_decode([r.sequences_ids[0] for r in results], skip_special_tokens=True)
    return [t.strip() for t in ours], [t.strip() for t in theirs]


def verify(model: str, exported: Path, files: list[Path], exact: bool, language: str = "",
           max_new_tokens: int = 128) -> int:
    ours, theirs = transcripts(model, exported, files, language, max_new_tokens)
    differ = [(f, a, b) for f, a, b in zip(files, ours, theirs) if a != b]
    print(f"whisper-ft export: {len(files) - len(differ)} of {len(files)} clips transcribed the same by "
          "transformers and the export", file=sys.stderr)
    for f, a, b in differ[:10]:
        print(f"  {f}\n    transformers: {a}\n    ctranslate2:  {b}", file=sys.stderr)
    if differ and exact:
        print("whisper-ft export: a float32 export must transcribe exactly like the model; it does not",
              file=sys.stderr)
        return Exit.ERROR
    if differ:
        print("whisper-ft export: quantized weights can change a few words; compare with --quantization float32",
              file=sys.stderr)
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
