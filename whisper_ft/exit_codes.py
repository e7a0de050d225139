"""The exit codes of every whisper-ft command, in one place: scripts and the tests rely on them."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0  # done, or nothing to do (a finished run rerun, stop_at_step reached)
    ERROR = 1  # bad input or data, a model that will not load, a checkpoint that cannot be written
    CONFIG = 2  # the configuration (or the checkpoints of another run in checkpoint_dir) is wrong
    STOPPED = 3  # stopped by a signal after saving: rerun the same command to resume
