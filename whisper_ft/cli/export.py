"""Export a Whisper model folder for the runtimes people deploy it with, and check it transcribes the same.

    pip install -r requirements-export.txt          # the runtimes: optional extras
    python -m whisper_ft.cli.export --model RUN/final --format ctranslate2|ggml|openai|onnx
                                    [--quantization Q] [--output-dir DIR] [--force] [--verify clip1.mp3 ...]

ctranslate2 (faster-whisper): model.bin, config.json and vocabulary.json from CTranslate2's converter, plus
  tokenizer.json (without it faster-whisper falls back to openai's tokenizer, wrong for an extended
  vocabulary) and preprocessor_config.json (the log-mel size: 128 bins for large-v3, 80 for the others).
ggml (whisper.cpp): ggml-model.bin with the model's own mel filters and vocabulary (float16).
openai (openai-whisper): model.pt, which whisper.load_model("DIR/model.pt") loads (float16 or float32).
onnx (sherpa-onnx): encoder.onnx, decoder.onnx, tokens.txt, and the int8 pair encoder.int8.onnx,
  decoder.int8.onnx, which sherpa_onnx.OfflineRecognizer.from_whisper loads.

The output folder must be new, empty, or a previous export of the same format (--force replaces that
one only; never a training run, the input model or a folder holding it).
--verify transcribes the given clips (first 30 s, greedy, no timestamps) with both the transformers model
and the export in its own runtime, prints both and the word error rate between them. A float32 export
must transcribe exactly like the model (exit 1 if not); float16 and quantized weights may legitimately
change a few words, so there a difference is only reported.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from whisper_ft.exit_codes import Exit
from whisper_ft.export_output import OutputError, write_export

QUANTIZATIONS = {
    "ctranslate2": ("float16", "float32", "bfloat16", "int8", "int8_float16", "int8_float32", "int8_bfloat16",
                    "int16"),
    # float32 ggml files load, but whisper.cpp's CPU kernels (pywhispercpp 1.5.1) abort on them: F16 asserts.
    "ggml": ("float16",),
    "openai": ("float16", "float32"),
    # onnx writes float32 and int8 (onnxruntime dynamic quantization of the MatMuls) side by side.
    "onnx": ("float32",),
}
RUNTIME_PACKAGE = {"ctranslate2": "ctranslate2", "ggml": "pywhispercpp", "openai": "openai-whisper",
                   "onnx": "sherpa-onnx"}
SUFFIX = {"ctranslate2": "ct2", "ggml": "ggml", "openai": "openai", "onnx": "onnx"}
EXTRA_FILES = ("tokenizer.json", "preprocessor_config.json")


class ExportError(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m whisper_ft.cli.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Whisper model folder (a run's checkpoint_dir) or Hub id")
    p.add_argument("--format", default="ctranslate2", choices=tuple(QUANTIZATIONS), help="export format")
    p.add_argument("--quantization", default=None,
                   help="weight type; ctranslate2: " + ", ".join(QUANTIZATIONS["ctranslate2"]) +
                        "; openai: float16 or float32; ggml: float16; onnx: float32, with an int8 pair beside it "
                        "(default: float16, onnx float32)")
    p.add_argument("--output-dir", default="", help="default: <model folder>-ct2, -ggml or -openai")
    p.add_argument("--force", action="store_true", help="replace a previous export of the same format there")
    p.add_argument("--verify", nargs="+", default=[], metavar="AUDIO", help="clips to transcribe with both")
    p.add_argument("--language", default="", help="language for --verify; default: the model's generation config")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per clip in --verify")
    return p.parse_args(argv)


def require(fmt: str):
    """Import the runtime of fmt, or say which pip install brings it."""
    modules = {"ctranslate2": ["ctranslate2"], "ggml": ["pywhispercpp"], "openai": ["whisper"],
               # the ONNX graphs are traced from openai-whisper's modules; onnx and onnxruntime write and quantize
               "onnx": ["sherpa_onnx", "whisper", "onnx", "onnxruntime"]}[fmt]
    try:
        for module in modules:
            __import__(module)
    except ImportError:
        if fmt == "onnx":
            raise ExportError("--format onnx needs sherpa-onnx, openai-whisper, onnx and onnxruntime: pip install "
                              "sherpa-onnx openai-whisper onnx onnxruntime (or pip install -r "
                              "requirements-export.txt)") from None
        raise ExportError(f"the {RUNTIME_PACKAGE[fmt]} package is not installed: pip install "
                          f"{RUNTIME_PACKAGE[fmt]} (or pip install -r requirements-export.txt)") from None


def usage(fmt: str, out: Path) -> str:
    return {
        "ctranslate2": "from faster_whisper import WhisperModel\n"
                       f"  segments, info = WhisperModel({str(out)!r}).transcribe('audio.mp3')",
        "ggml": f"whisper-cli -m {out}/ggml-model.bin -f audio.wav   (whisper.cpp), or\n"
                f"  pywhispercpp.model.Model({str(out / 'ggml-model.bin')!r}).transcribe('audio.wav')",
        "openai": f"whisper audio.mp3 --model {out}/model.pt   (openai-whisper), or\n"
                  f"  whisper.load_model({str(out / 'model.pt')!r}).transcribe('audio.mp3')",
        "onnx": f"sherpa_onnx.OfflineRecognizer.from_whisper(encoder='{out}/encoder.onnx', "
                f"decoder='{out}/decoder.onnx', tokens='{out}/tokens.txt')   (encoder.int8.onnx, "
                "decoder.int8.onnx: int8)",
    }[fmt]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fmt = args.format
    args.quantization = args.quantization or ("float32" if fmt == "onnx" else "float16")
    if args.quantization not in QUANTIZATIONS[fmt]:
        print(f"whisper-ft export: --quantization {args.quantization} is not one {fmt} offers; choose one of "
              + ", ".join(QUANTIZATIONS[fmt]), file=sys.stderr)
        return Exit.ERROR
    out = Path(args.output_dir or f"{args.model.rstrip('/')}-{SUFFIX[fmt]}")
    try:
        require(fmt)
        inputs = [Path(args.model)] if Path(args.model).exists() else []
        if fmt == "ctranslate2":
            write_export(out, fmt, inputs, args.force,
                         lambda tmp: export_ctranslate2(args.model, tmp, args.quantization))
        else:
            write_export(out, fmt, inputs, args.force,
                         lambda tmp: export_weights(args.model, tmp, fmt, args.quantization))
        print(f"whisper-ft export: wrote {out} ({fmt}, {args.quantization}); use it with\n  {usage(fmt, out)}",
              file=sys.stderr)
        if args.verify:
            return verify(args.model, fmt, out, [Path(f) for f in args.verify],
                          exact=args.quantization == "float32", language=args.language,
                          max_new_tokens=args.max_new_tokens)
    except (ExportError, OutputError) as e:
        print(f"whisper-ft export: {e}", file=sys.stderr)
        return Exit.ERROR
    return Exit.OK


def load(model: str):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from whisper_ft.model import ModelError, from_pretrained

    try:
        return (from_pretrained(WhisperForConditionalGeneration, model).eval(),
                from_pretrained(WhisperProcessor, model))
    except ModelError as e:
        raise ExportError(str(e)) from None


def export_weights(model: str, tmp: Path, fmt: str, quantization: str) -> dict:
    from whisper_ft.export_ggml import export_ggml
    from whisper_ft.export_onnx import export_onnx
    from whisper_ft.export_openai import export_openai

    hf, processor = load(model)
    try:
        if fmt == "onnx":
            return export_onnx(hf, processor, tmp)
        if fmt == "ggml":
            return export_ggml(hf, processor, tmp, half=quantization == "float16")
        return export_openai(hf, tmp, half=quantization == "float16", tokenizer=processor.tokenizer)
    except ValueError as e:
        raise ExportError(f"cannot export {model} to {fmt}: {e}") from None
    except OSError as e:
        raise ExportError(f"writing the {fmt} export failed: {e}") from None


def export_ctranslate2(model: str, tmp: Path, quantization: str) -> dict:
    """Convert with CTranslate2's converter into the temporary folder and add the processor files."""
    from ctranslate2.converters import TransformersConverter

    _, processor = load(model)
    try:
        TransformersConverter(model, load_as_float16=quantization == "float16").convert(
            str(tmp), quantization=quantization, force=True)
        # transformers 5 keeps the feature extractor in processor_config.json; faster-whisper reads only
        # preprocessor_config.json, so write that one from the feature extractor itself.
        processor.feature_extractor.save_pretrained(tmp / ".processor")
        processor.tokenizer.save_pretrained(tmp / ".processor")
        for name in EXTRA_FILES:
            if not (tmp / ".processor" / name).is_file():
                raise ExportError(f"saving the processor of {model} wrote no {name}")
            shutil.copy2(tmp / ".processor" / name, tmp / name)
        shutil.rmtree(tmp / ".processor")
    except ExportError:
        raise
    except Exception as e:  # the converter raises many types (unsupported architecture, bad weights, disk full)
        raise ExportError(f"converting {model} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    return {"quantization": quantization}


def reference(model: str, files: list[Path], language: str, max_new_tokens: int):
    """transformers' greedy, no-timestamp transcripts of the clips (first 30 s), one generate call each,
    with what the runtimes need to decode the same way."""
    import torch

    from whisper_ft.languages import resolve
    from whisper_ft.model import is_multilingual
    from whisper_ft.transcription import load_audio

    hf, processor = load(model)
    kwargs = {}
    if is_multilingual(hf):
        code = resolve(language).code if language else hf.generation_config.language
        if not code:
            raise ExportError("the model's generation config names no language: pass --language for --verify")
        kwargs = {"language": code, "task": hf.generation_config.task or "transcribe"}
    try:
        audios = [load_audio(f) for f in files]
    except Exception as e:
        raise ExportError(f"--verify could not read its audio: {e}") from None
    features = processor.feature_extractor(audios, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = hf.generate(features, attention_mask=torch.ones(features.shape[::2], dtype=torch.long),
                          max_new_tokens=max_new_tokens, return_timestamps=False, force_unique_generate_call=True,
                          **kwargs)
    texts = [t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return hf, processor, audios, features.numpy(), kwargs, texts


def runtime_texts(fmt: str, exported: Path, hf, processor, audios, features, kwargs, max_new_tokens,
                  int8: bool = False) -> list[str]:
    import numpy as np

    tokenizer = processor.tokenizer
    decode = lambda seqs: [t.strip() for t in tokenizer.batch_decode(seqs, skip_special_tokens=True)]  # noqa: E731
    if fmt == "ctranslate2":
        import ctranslate2

        tokenizer.set_prefix_tokens(language=kwargs.get("language"), task=kwargs.get("task"),
                                    predict_timestamps=False)
        prompt = tokenizer.prefix_tokens  # <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>
        ct2 = ctranslate2.models.Whisper(str(exported), device="cpu", compute_type="default")
        # CTranslate2 decodes at most max_length / 2 new tokens: ask for twice as many to match.
        results = ct2.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
                               [prompt] * len(audios), beam_size=1, max_length=2 * max_new_tokens)
        return decode([r.sequences_ids[0] for r in results])
    if fmt == "openai":
        from whisper_ft.export_openai import transcribe_openai

        gen = hf.generation_config
        # openai-whisper's decoder with the suppression rules of the model's own generation config: its
        # defaults (suppress "-1", blank) are openai's vocabulary's ids, not a custom tokenizer's.
        ids = transcribe_openai(exported, audios, kwargs.get("language") or ("en" if not kwargs else None),
                                kwargs.get("task", "transcribe"), max_new_tokens,
                                list(gen.suppress_tokens or []), 220 in (gen.begin_suppress_tokens or []))
        return decode(ids)
    if fmt == "onnx":
        from whisper_ft.export_onnx import greedy_onnxruntime

        gen = hf.generation_config
        tokenizer.set_prefix_tokens(language=kwargs.get("language"), task=kwargs.get("task"),
                                    predict_timestamps=False)
        return decode(greedy_onnxruntime(exported, features, tokenizer.prefix_tokens, gen.eos_token_id,
                                         max_new_tokens, list(gen.suppress_tokens or []),
                                         list(gen.begin_suppress_tokens or []), int8=int8))
    if fmt == "sherpa-onnx":
        from whisper_ft.export_onnx import transcribe_onnx

        return transcribe_onnx(exported, audios, kwargs.get("language"), int8=int8)
    from whisper_ft.export_ggml import transcribe_ggml

    return transcribe_ggml(exported, audios, kwargs.get("language"), max_new_tokens)


def word_error_rate(ref: list[str], hyp: list[str]) -> float:
    import jiwer

    pairs = [(r, h) for r, h in zip(ref, hyp) if r.strip()]
    if not pairs:
        return 0.0 if not any(h.strip() for h in hyp) else 1.0
    return jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])


def verify(model: str, fmt: str, exported: Path, files: list[Path], exact: bool, language: str = "",
           max_new_tokens: int = 128) -> int:
    hf, processor, audios, features, kwargs, ours = reference(model, files, language, max_new_tokens)
    # onnx: the graphs in onnxruntime on transformers' features must agree exactly (float32); sherpa-onnx
    # (its own log-mel, a few 1e-5 from transformers', which can flip a near tie: docs/deploy.md) and the
    # int8 pair written beside the float32 one are reported.
    variants = [(fmt, fmt, False, exact)]
    if fmt == "onnx":
        variants = [("onnx (onnxruntime)", "onnx", False, exact), ("onnx int8 (onnxruntime)", "onnx", True, False),
                    ("sherpa-onnx", "sherpa-onnx", False, False), ("sherpa-onnx int8", "sherpa-onnx", True, False)]
    failed = False
    for label, runtime, int8, must_agree in variants:
        try:
            theirs = runtime_texts(runtime, exported, hf, processor, audios, features, kwargs, max_new_tokens, int8)
        except ExportError:
            raise
        except Exception as e:  # a runtime that cannot load or run the export: say so, never a traceback
            raise ExportError(f"the {RUNTIME_PACKAGE[fmt]} runtime failed on the export: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None
        differ = [(f, a, b) for f, a, b in zip(files, ours, theirs) if a != b]
        print(f"whisper-ft export: {len(files) - len(differ)} of {len(files)} clips transcribed the same by "
              f"transformers and the {label} export; WER of the export against transformers "
              f"{100 * word_error_rate(ours, theirs):.1f}%", file=sys.stderr)
        for f, a, b in zip(files, ours, theirs):
            mark = "  " if a == b else "! "
            print(f"{mark}{f}\n    {'transformers:':{len(label) + 1}} {a}\n    {label + ':'} {b}", file=sys.stderr)
        if differ and must_agree:
            print(f"whisper-ft export: a float32 {label} export must transcribe exactly like the model; it does not",
                  file=sys.stderr)
            failed = True
        elif differ:
            print("whisper-ft export: float16 or quantized weights can change a few words; compare with "
                  "--quantization float32", file=sys.stderr)
    return Exit.ERROR if failed else Exit.OK


if __name__ == "__main__":
    sys.exit(main())
