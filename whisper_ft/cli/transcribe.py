"""Transcribe audio files with a (fine-tuned) Whisper: whole files of any length, with segment times.

    python -m whisper_ft.cli.transcribe --model DIR_OR_HUB_ID FILE_OR_FOLDER... [--format txt srt vtt json]
                                        [--output-dir transcripts] [--language as] [--task transcribe]

Audio longer than 30 s is transcribed whole, not cut: the log-mel features of the full file go to
transformers' long-form generation, which decodes one 30-s window after another, each starting where
the previous one's last timestamp ended. Language and task come from the model's generation config
(a whisper-ft model carries its training language) unless --language / --task say otherwise.
Files that cannot be read are reported and skipped; the others are still transcribed, and the
exit code is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from whisper_ft.exit_codes import Exit
from whisper_ft.transcription import AUDIO_SUFFIXES, FORMATS, TranscribeError, Transcriber, write_outputs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m whisper_ft.cli.transcribe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_FOLDER", help="audio files, or folders searched for them")
    p.add_argument("--model", required=True, help="model folder (e.g. a run's checkpoint_dir) or Hub id")
    p.add_argument("--format", nargs="+", default=["txt"], choices=FORMATS + ("all",), help="output formats")
    p.add_argument("--output-dir", default="transcripts", help="where <name>.<format> files go")
    p.add_argument("--language", default="", help="spoken language; default: the model's generation config")
    p.add_argument("--task", default="", choices=("", "transcribe", "translate"),
                   help="default: the model's generation config, else transcribe")
    p.add_argument("--batch-size", type=int, default=8, help="files decoded together")
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 ...; default: cuda when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="auto: float16 on a GPU, float32 on CPU")
    p.add_argument("--token", default="", help="Hub token for a private model; default $HF_TOKEN or the login cache")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files, errors = find_audio(args.inputs)
    if not files:
        report(0, errors)
        return Exit.ERROR
    try:
        transcriber = Transcriber(args.model, language=args.language, task=args.task, device=args.device,
                                  dtype=args.dtype, token=args.token)
    except TranscribeError as e:
        print(f"whisper-ft transcribe: {e}", file=sys.stderr)
        return Exit.ERROR
    formats = FORMATS if "all" in args.format else tuple(dict.fromkeys(args.format))
    out = Path(args.output_dir)
    names = output_names(files)
    done = 0
    for start in range(0, len(files), args.batch_size):
        batch = files[start : start + args.batch_size]
        transcripts, failed = transcriber(batch)
        errors += failed
        for t in transcripts:
            write_outputs(t, out / names[t.path], formats, transcriber.describe())
            print(f"{t.path}\t{t.text}", flush=True)
            done += 1
    report(done, errors)
    if done:
        print(f"whisper-ft transcribe: wrote {', '.join(formats)} for {done} file(s) to {out}", file=sys.stderr)
    return Exit.ERROR if errors else Exit.OK


def find_audio(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named directly (any extension) and audio files found in folders; missing paths are errors."""
    files, errors = [], []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                errors.append((raw, f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in this folder"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            errors.append((raw, "no such file or folder"))
    return list(dict.fromkeys(files)), errors


def output_names(files: list[Path]) -> dict[Path, str]:
    """<stem> per file; a stem that repeats (a.mp3 and a.wav, or two folders) gets -2, -3 ... so none is overwritten."""
    names, seen = {}, {}
    for path in files:
        n = seen[path.stem] = seen.get(path.stem, 0) + 1
        names[path] = path.stem if n == 1 else f"{path.stem}-{n}"
    return names


def report(done: int, errors: list[tuple[str, str]]) -> None:
    if errors:
        print(f"whisper-ft transcribe: {len(errors)} input(s) failed, {done} transcribed:", file=sys.stderr)
        for name, reason in errors:
            print(f"  {name}: {reason}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
