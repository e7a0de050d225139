"""What FSDP and DeepSpeed (chosen by `accelerate launch --config_file accelerate_configs/...`) change for the
loop: combinations refused before anything starts, the DeepSpeed settings the loop owns, parameter counts
that sharding hides, and what evaluation needs when every forward is a collective. Plain data parallelism
(DDP) needs none of it.

accelerate tells the script which mode it runs under only through environment variables set by
`accelerate launch`, so the checks read those: ACCELERATE_USE_FSDP, ACCELERATE_USE_DEEPSPEED and friends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from typing import Any, Mapping


def _on(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "false").lower() == "true"


def launch_problems(cfg, env: Mapping[str, str]) -> list[str]:
    """Combinations of this config and the accelerate launch that cannot work, each as one sentence."""
    fsdp, ds = _on(env, "ACCELERATE_USE_FSDP"), _on(env, "ACCELERATE_USE_DEEPSPEED")
    if not (fsdp or ds):
        return []
    name = "DeepSpeed" if ds else "FSDP"
    problems = []
    import torch
    if _on(env, "ACCELERATE_USE_CPU") or not torch.cuda.is_available():
        # FSDP on CPU processes silently becomes plain data parallelism; DeepSpeed's CPU accelerator (gloo) is for
        # testing DeepSpeed itself, not for training
        problems.append(f"{name} needs CUDA GPUs and none is visible (or the launch asked for the CPU); on CPU "
                        "use accelerate_configs/cpu.yaml or torchrun with ACCELERATE_USE_CPU=true")
    if ds and importlib.util.find_spec("deepspeed") is None:
        problems.append("the accelerate config asks for DeepSpeed, which is not installed: `pip install deepspeed` "
                        "(it is not in requirements.txt: most runs do not need it)")
    if ds:
        problems += _deepspeed_config_problems(cfg, env)
    if fsdp and _on(env, "FSDP_ACTIVATION_CHECKPOINTING") and cfg.gradient_checkpointing:
        problems.append("fsdp_activation_checkpointing in the accelerate config and gradient_checkpointing in the "
                        "whisper-ft config both checkpoint activations; turn one off (whisper-ft's is tested)")
    zero3 = ds and launch_zero_stage(env) == 3
    if (fsdp or zero3) and cfg.predict_with_generate and cfg.eval_strategy != "no":
        # Whisper's generate() decides per batch how many decoding passes to run; with sharded weights every
        # pass is a collective, and processes that disagree wait on each other for ever (seen with FSDP2).
        problems.append(f"predict_with_generate is not supported with {'FSDP' if fsdp else 'DeepSpeed ZeRO-3'} "
                        "(generation on sharded weights can hang); set predict_with_generate: false and "
                        "metric_for_best_model: loss, and measure WER on the final model with whisper_ft.cli.evaluate "
                        "(or train with DeepSpeed ZeRO-2 or plain data parallelism)")
    if ds and getattr(cfg, "optim", "adamw_torch") != "adamw_torch":
        problems.append(f"optim {cfg.optim} is not supported under DeepSpeed, which partitions the optimizer "
                        "state itself; use optim: adamw_torch")
    return problems


def launch_zero_stage(env: Mapping[str, str]) -> int | None:
    """The ZeRO stage of a DeepSpeed launch: from accelerate's own setting or from the DeepSpeed JSON it names."""
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    if stage.isdigit():
        return int(stage)
    try:
        with open(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", ""), encoding="utf-8") as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _deepspeed_config_problems(cfg, env: Mapping[str, str]) -> list[str]:
    """The loop owns the optimizer, the LR schedule, the micro-batch size and the accumulation count."""
    problems = []
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    if gas.isdigit() and int(gas) != cfg.gradient_accumulation_steps:
        problems.append(f"the accelerate config sets gradient_accumulation_steps {gas} but the whisper-ft config "
                        f"{cfg.gradient_accumulation_steps}; remove it from the accelerate config (whisper-ft fills it)")
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "None":
        return problems
    try:
        with open(path, encoding="utf-8") as f:
            ds_config = json.load(f)
    except (OSError, ValueError) as e:
        return problems + [f"cannot read the DeepSpeed config {path}: {e}"]
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            problems.append(f"the DeepSpeed config {path} has a {section!r} section; remove it: whisper-ft uses its "
                            "own AdamW and learning-rate schedule (learning_rate, warmup_steps, lr_scheduler_type)")
    for key, ours in (("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
                      ("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size)):
        if ds_config.get(key, "auto") not in ("auto", ours):
            problems.append(f"the DeepSpeed config {path} sets {key} {ds_config[key]}, the whisper-ft config "
                            f"{ours}; set it to \"auto\"")
    return problems


def deepspeed_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def is_sharded(accelerator) -> bool:
    """Parameters split across processes: every forward is a collective that all processes must join."""
    return accelerator.distributed_type.name == "FSDP" or deepspeed_stage(accelerator) == 3


def configure_deepspeed(accelerator, cfg, say) -> None:
    """Fill the DeepSpeed values the loop owns, before prepare (accelerate would guess them otherwise).

    We do not prepare a DataLoader (each process reads its own shard), so accelerate cannot infer the
    micro-batch size; its "auto" gradient clipping would be 1.0 whatever max_grad_norm says. DeepSpeed
    clips inside its step, so accelerator.clip_grad_norm_ only reports the norm there.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds_config = plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = cfg.per_device_train_batch_size
    ds_config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = float(cfg.max_grad_norm)
    say("DeepSpeed applies each update inside the last backward of the step, so a step with a NaN/inf loss "
        "cannot be skipped (fp16's loss scaler still skips overflows); the run stops after max_nonfinite_steps "
        "such steps without saving, the last checkpoint intact")


@contextlib.contextmanager
def whole_model_load(accelerator):
    """Under ZeRO-3 with zero3_init_flag false (accelerate_configs/deepspeed_zero3.yaml): from_pretrained builds
    the whole model in each process, and prepare() partitions it, as that flag promises.

    accelerate 1.15 registers its DeepSpeed config with transformers whatever the flag says, and from_pretrained
    then builds the model already partitioned (deepspeed.zero.Init): transformers reports the tied proj_out as
    missing and initialises it on partitioned weights, which fails in Whisper's _init_weights (DESIGN: ZeRO-3
    loading). The registration is lifted for the load and restored after it.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_stage(accelerator) != 3 or plugin.is_zero3_init_enabled():
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def count_parameters(model, trainable_only: bool = False) -> int:
    """Parameters of the whole model: under ZeRO-3 (zero.Init) a parameter's own numel() is its shard, or 0."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def fsdp1_root_weights(accelerator, model):
    """FSDP1: the root unit's weights whole while evaluation calls the unwrapped model directly.

    FSDP1 keeps the weights outside the wrapped layers (convolutions, embeddings, final norms) in the root
    wrapper, which a call of the unwrapped model bypasses; the nested layer units gather their own. (FSDP2
    shards the model in place: the unwrapped model is the root and its forward gathers.)
    """
    if accelerator.distributed_type.name != "FSDP" or is_fsdp2(accelerator):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, recurse=False, writeback=False):
        yield


def placeholder_batch(config, device) -> dict[str, Any]:
    """One silent sample for a process whose eval shard ran out while the others still generate."""
    import torch

    from whisper_ft.collate import IGNORE_INDEX

    return {"input_features": torch.zeros(1, config.num_mel_bins, 2 * config.max_source_positions, device=device),
            "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long, device=device), "ids": [], "bad": []}
