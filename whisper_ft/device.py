"""Which device a run trains on: the GPU asked for, the CPU when asked for, or a clear refusal.

A GPU can be asked for in two ways: `gpu_device` / `-g N` (plain `python train_loop.py`), or
`accelerate launch --gpu_ids N`, which sets CUDA_VISIBLE_DEVICES. When the GPU asked for does not
exist, torch quietly reports no CUDA device and the run would train on the CPU at a twentieth of
the speed; so this is checked before the model loads, and the run stops naming the GPUs there are.
"""

from __future__ import annotations

import os
import subprocess
import sys

from whisper_ft.config import Config, ConfigError


def choose(cfg: Config, env: dict[str, str] | None = None) -> bool:
    """Set CUDA_VISIBLE_DEVICES for the GPU(s) asked for; True when the run must use the CPU.

    Raises ConfigError when a GPU was asked for that torch cannot see. Call it before anything
    initialises CUDA (the environment variable is read once).
    """
    env = os.environ if env is None else env
    choice = cfg.gpu_device.replace(" ", "").lower()
    if choice == "cpu":  # deliberate: hide the GPUs, so nothing (accelerate, DataLoader pinning) uses one
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["ACCELERATE_USE_CPU"] = "true"
        return True
    import torch

    visible = env.get("CUDA_VISIBLE_DEVICES")
    if choice and "LOCAL_RANK" not in env:  # plain `python train_loop.py -g 1`: choose among the visible GPUs
        ids = [int(i) for i in choice.split(",")]
        count = torch.cuda.device_count()
        if max(ids) >= count:
            raise ConfigError([f"gpu_device {cfg.gpu_device} asked for, but {_gpus_here(env)}; "
                               "choose a GPU that exists, or -g cpu to train on the CPU deliberately"])
        shown = visible.split(",") if visible else None  # ids count within an existing restriction
        env["CUDA_VISIBLE_DEVICES"] = ",".join(shown[i] if shown else str(i) for i in ids)
        return False
    asked = [v for v in (visible or "").split(",") if v.strip() and v.strip() != "-1"]
    # CUDA stops at the first id that does not exist: "0,5" on a 2-GPU machine shows one GPU, not two.
    if asked and torch.cuda.device_count() < len(asked):
        # accelerate launch --gpu_ids N (or an exported CUDA_VISIBLE_DEVICES) naming a GPU that is not there
        raise ConfigError([f"CUDA_VISIBLE_DEVICES={visible} (set by accelerate launch --gpu_ids or your shell) asks "
                           f"for GPU {visible}, but {_gpus_here(env)}; choose a GPU that exists, or pass -g cpu to "
                           "train on the CPU deliberately"])
    return False


def _gpus_here(env) -> str:
    """The machine's GPUs, seen without any CUDA_VISIBLE_DEVICES restriction (a fresh process: CUDA reads it once)."""
    clean = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    code = ("import torch; n = torch.cuda.device_count(); "
            "print('; '.join(f'{i}: {torch.cuda.get_device_name(i)}' for i in range(n)))")
    try:
        names = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                               timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        names = ""
    return f"this machine's GPUs are {names}" if names else "there is no CUDA GPU on this machine"


def describe(accelerator) -> str:
    """The log line saying where and how the run trains."""
    import torch

    device = accelerator.device
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    precision = accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32"
    return f"training on {where}, precision {precision}, {accelerator.num_processes} process(es)"
