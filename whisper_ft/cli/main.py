"""The `whisper-ft` command: one entry point for every subcommand.

    whisper-ft train --config config.yaml          # the training loop (train_loop.py), in one process
    accelerate launch -m whisper_ft train ...      # the same under accelerate: several GPUs, FSDP, DeepSpeed
    whisper-ft evaluate | transcribe | export | inspect --help
"""

from __future__ import annotations

import difflib
import importlib
import sys

# name -> (module whose main(argv) runs it, one line for --help)
COMMANDS = {
    "train": ("train_loop", "fine-tune Whisper; rerun the same command to resume (train_loop.py)"),
    "evaluate": ("whisper_ft.cli.evaluate", "WER/CER of any Whisper on a dataset; --long-form for long recordings"),
    "transcribe": ("whisper_ft.cli.transcribe", "audio files of any length to txt/srt/vtt/json"),
    "export": ("whisper_ft.cli.export", "a fine-tuned model for faster-whisper, whisper.cpp, openai-whisper, ONNX"),
    "inspect": ("whisper_ft.cli.inspect", "check a dataset before training: broken, mislabelled and odd samples"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return ("usage: whisper-ft COMMAND [options]   (whisper-ft COMMAND --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"whisper-ft: unknown command {name!r}{f'; did you mean {near[0]!r}?' if near else ''}\n\n{usage()}",
              file=sys.stderr)
        return 2
    command = importlib.import_module(COMMANDS[name][0])
    sys.argv[0] = f"whisper-ft {name}"  # what the subcommand's own --help and messages call it
    return command.main(rest)


if __name__ == "__main__":
    sys.exit(main())
