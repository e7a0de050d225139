"""Run by tests/test_speed.py: train_loop.main in this process, counting every read-back of a tensor value to the
host (aten._local_scalar_dense: what .item(), float(), int() and bool() of a tensor call; on a GPU each one waits
for all the work queued before it). Each is attributed to the optimizer step running at the time and to where it
happened: in the model's forward (transformers' own, eager only: a packed-sequence check in its causal mask),
elsewhere in train_step (which queues a step), in settle (which reads a queued step back), or elsewhere.

argv: config path, output json. Writes {"steps": [{"model": n, "train_step": n, "settle": n, "elsewhere": n}]}.
"""

import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_loop  # noqa: E402
from whisper_ft import speed  # noqa: E402

config, out = sys.argv[1], Path(sys.argv[2])
steps: list[dict[str, int]] = []
where = ["elsewhere"]


class CountReadbacks(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and steps:
            steps[-1][where[-1]] += 1
        return func(*args, **(kwargs or {}))


def inside(name, fn, new_step=False):
    def wrapped(*args, **kwargs):
        if new_step:
            steps.append({"model": 0, "train_step": 0, "settle": 0, "elsewhere": 0})
        where.append(name)
        try:
            return fn(*args, **kwargs)
        finally:
            where.pop()
    return wrapped


train_loop.train_step = inside("train_step", train_loop.train_step, new_step=True)
train_loop.settle = inside("settle", train_loop.settle)
speed.CompiledForward.__call__ = inside("model", speed.CompiledForward.__call__)
with CountReadbacks():
    code = train_loop.main(["--config", config])
out.write_text(json.dumps({"exit": code, "steps": steps}))
