"""Which device a run trains on: the GPU asked for, the CPU when asked for, or a clear refusal.

A GPU can be asked for in two ways: `gpu_device` / `-g N`, or `accelerate launch --gpu_ids N`, which
sets CUDA_VISIBLE_DEVICES. Where both are given the launcher's choice wins (with a warning when they
differ); `gpu_device` alone is honoured under `accelerate launch` too, so the guide's `gpu_device: 1`
does not silently land on GPU 0, which may be another user's. When the GPU asked for does not
exist, torch quietly reports no CUDA device and the run would train on the CPU at a twentieth of
the speed; so this is checked before the model loads, and the run stops naming the GPUs there are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

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
    launched = "LOCAL_RANK" in env
    if choice and launched and visible is not None:
        # accelerate launch --gpu_ids (or the shell) already chose: the command line wins over the config
        if visible.replace(" ", "") != choice:
            warnings.warn(f"gpu_device {cfg.gpu_device} is ignored: CUDA_VISIBLE_DEVICES={visible} (accelerate "
                          "launch --gpu_ids or your shell) chooses the GPU(s)", stacklevel=1)
    elif choice:  # python train_loop.py -g 1, or accelerate launch without --gpu_ids: choose among the visible GPUs
        ids = [int(i) for i in choice.split(",")]
        count = torch.cuda.device_count()
        if max(ids) >= count:
            raise ConfigError([f"gpu_device {cfg.gpu_device} asked for, but {_gpus_here(env)}; "
                               "choose a GPU that exists, or -g cpu to train on the CPU deliberately"])
        per_machine = int(env.get("LOCAL_WORLD_SIZE", "1"))
        if len(ids) < per_machine:  # each launched process takes cuda:LOCAL_RANK among the ones shown
            raise ConfigError([f"gpu_device {cfg.gpu_device} names {len(ids)} GPU(s) for {per_machine} processes "
                               "on this machine; name one GPU per process, leave gpu_device empty (-g \"\") to use "
                               "every GPU, or launch with --gpu_ids"])
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


def mixed_precision(cfg: Config, on_cpu: bool = False) -> str:
    """accelerate's mixed_precision for fp16/bf16: "no" on the CPU, and fp16 where the GPU has no bf16."""
    import torch

    if not (cfg.fp16 or cfg.bf16):
        return "no"
    if on_cpu:  # -g cpu: asked for, so no warning; fp16 autocast on the CPU would only be slower
        return "no"
    if not torch.cuda.is_available():
        warnings.warn(f"{'fp16' if cfg.fp16 else 'bf16'} asked for, but there is no CUDA device: training in fp32",
                      stacklevel=1)
        return "no"
    if cfg.bf16 and not torch.cuda.is_bf16_supported():  # pre-Ampere cards (V100, T4): the shipped config still runs
        warnings.warn("bf16 asked for, but this GPU does not support it: training in fp16", stacklevel=1)
        return "fp16"
    return "fp16" if cfg.fp16 else "bf16"
