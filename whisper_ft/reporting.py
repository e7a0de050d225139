"""The run's console output: messages on the main process only, above the progress bar, and a progress bar
that writes whole lines into a log file (train.log) instead of carriage-return redraws."""

from __future__ import annotations

import os
import sys


class Reporter:
    """Prints on the main process only, above the progress bar when one is running."""

    def __init__(self, accelerator):
        self.main = accelerator.is_main_process

    def __call__(self, message: str, to_bar: bool = False) -> None:
        if not self.main:
            return
        from tqdm.auto import tqdm
        tqdm.write(message, file=sys.stderr)  # on a terminal: above the bar, which is redrawn below it
        sys.stderr.flush()


def progress_bar(total: int, initial: int, enabled: bool):
    """The training progress bar; in a log file a line a minute, not a flood."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", dynamic_ncols=True,
                file=bar_file(), mininterval=1 if sys.stderr.isatty() else 60)


def bar_file():
    """Where the progress bar draws: the terminal, or, in a log file, one whole line per draw.

    tqdm redraws in place with a carriage return and no newline; in train.log the next message would be
    glued onto the bar's line. Every draw is therefore made a line of its own there.
    """
    return sys.stderr if sys.stderr.isatty() else _Lines(sys.stderr)


class _Lines:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip(" ")  # tqdm's in-place redraw and its clearing padding
        if text.strip():
            self.stream.write(text if text.endswith("\n") else text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def survive_a_closed_stderr() -> None:
    """Keep the run's messages going when stderr's reader is gone: write them to stdout instead.

    accelerate 1.16's one-process launcher pipes the trainer's stderr through itself. If the launcher dies
    first (killed, or ended by its own signal handling), every later message, "saved checkpoint-N" included,
    would raise BrokenPipeError in the middle of a save. stdout is the launcher's own output (train.log under
    launch.sh or a scheduler), so the messages still reach the log.
    """
    if not isinstance(sys.stderr, _Fallback):
        sys.stderr = _Fallback(sys.stderr, sys.stdout)


class _Fallback:
    def __init__(self, stream, fallback):
        self.stream, self.fallback = stream, fallback

    def _retry(self, method: str, *args):
        try:
            return getattr(self.stream, method)(*args)
        except BrokenPipeError:
            if self.fallback is None:
                return None
            try:  # the same file descriptor now writes into stdout's file: what was buffered, C++ warnings too
                os.dup2(self.fallback.fileno(), self.stream.fileno())
            except (OSError, ValueError, AttributeError):
                return None
            finally:
                self.fallback = None
            return self._retry(method, *args)

    def write(self, text: str):
        return self._retry("write", text)

    def flush(self) -> None:
        self._retry("flush")

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the stream
        return getattr(self.stream, name)
