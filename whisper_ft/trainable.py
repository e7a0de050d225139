"""What a run trains and how: SpecAugment, a frozen encoder, LoRA adapters, the optimizer, checkpoints that
hold only the trainable weights, and the plain Whisper model that comes out at the end.

These are the settings that let whisper-large-v3 fine-tune on a 12-24 GB card. train_loop.py loads the base
in base_dtype(), calls setup_model() and build_optimizer() before accelerator.prepare, keep_trainable_only()
after it, and exportable() before the final export; everything else in the loop is the same for every mode.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from whisper_ft.config import Config


def setup_model(model, cfg: Config, say, autocast: bool = False):
    """SpecAugment settings, the frozen encoder and LoRA, in that order; returns the model to train.

    With LoRA the result is a peft PeftModel around the Whisper model (the base weights frozen inside it).
    autocast: every forward of this model runs under torch.autocast (accelerator.native_amp), see add_lora.
    """
    from whisper_ft.model import ModelError

    spec_augment(model.config, cfg)
    if cfg.apply_spec_augment and cfg.mask_feature_length > model.config.num_mel_bins:
        raise ModelError(f"mask_feature_length {cfg.mask_feature_length} exceeds the model's "
                         f"{model.config.num_mel_bins} mel bins")
    if cfg.freeze_encoder:
        model.freeze_encoder()  # requires_grad False: no gradients, no optimizer state for the encoder
    if cfg.lora_r > 0:
        model = add_lora(model, cfg, autocast)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.lora_r or cfg.freeze_encoder:
        say(f"training {n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f}%)"
            + (f"; LoRA rank {cfg.lora_r} on {cfg.lora_target_modules}" if cfg.lora_r else "")
            + ("; encoder frozen" if cfg.freeze_encoder else ""))
    return model


def base_dtype(cfg: Config, mixed_precision: str) -> torch.dtype:
    """The dtype the base weights are loaded in: bf16 for a LoRA run under bf16, else fp32.

    LoRA never updates the base, and under bf16 autocast every matmul reads its weights in bf16 anyway: storing
    them so halves their memory (3 GB of large-v3's 6) and keeps the residual stream in bf16, which halves what
    gradient checkpointing keeps per layer. The adapters stay fp32 (peft's autocast_adapter_dtype), and the
    export merges them into an fp32 copy of the base (exportable), so the model out is not rounded to bf16.
    fp16 keeps an fp32 base: fp16's range is narrow, and its loss scaling is tuned for fp32 weights.
    (DESIGN: LoRA base in bf16.)
    """
    return torch.bfloat16 if cfg.lora_r > 0 and mixed_precision == "bf16" else torch.float32


def spec_augment(model_config, cfg: Config) -> None:
    """Whisper's own SpecAugment (masking in WhisperModel._mask_input_features, in training mode only).

    All five are written, on or off, so the run's config decides rather than whatever the base checkpoint
    happened to hold; they are saved with the exported model and have no effect at inference.
    """
    model_config.apply_spec_augment = cfg.apply_spec_augment
    model_config.mask_time_prob, model_config.mask_time_length = cfg.mask_time_prob, cfg.mask_time_length
    model_config.mask_feature_prob, model_config.mask_feature_length = cfg.mask_feature_prob, cfg.mask_feature_length


def target_modules(cfg: Config) -> list[str]:
    return [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]


def add_lora(model, cfg: Config, autocast: bool = False):
    """Wrap the model with LoRA adapters on the named Linear layers; every base weight is frozen.

    With freeze_encoder the encoder gets no adapters (only the decoder, cross-attention included, adapts).
    Under autocast, peft's cast of each adapter's input to the adapter's dtype (fp32) is turned off: autocast
    casts it back to bf16/fp16 for the matmul anyway, so the cast only copied the activation twice per adapter
    (DESIGN: LoRA's input casts). Without autocast the cast stays: a bf16 base would feed fp32 adapters.
    """
    from peft import LoraConfig, get_peft_model

    from whisper_ft.model import ModelError

    # peft only fails when no name matches at all: a typo beside a valid name would silently adapt less
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [m for m in target_modules(cfg) if m not in linear]
    if unknown:
        raise ModelError(f"lora_target_modules: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
                         f"Linear layer of this model; its Linear layers are {', '.join(sorted(linear))}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules(cfg), bias="none",
                      # a full-match regex on module paths such as model.encoder.layers.0.self_attn.q_proj
                      exclude_modules=r"model\.encoder\..*" if cfg.freeze_encoder else None)
    model = get_peft_model(model, lora)
    if autocast:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.cast_input_dtype_enabled = False  # read by peft's _cast_input_dtype
    return model


def build_optimizer(model, cfg: Config):
    """AdamW over the trainable parameters only: frozen ones get no optimizer state."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optim == "adamw_8bit":  # config.validate has checked that CUDA and bitsandbytes are there
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    # fused: one kernel for all parameters instead of several per tensor (CPU and CUDA alike)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)


def skips_on_device(optimizer, accelerator) -> bool:
    """Whether step_unless_nonfinite can skip a NaN/inf step on the device: torch's fused AdamW (the default
    optimizer) takes a found_inf tensor, as torch.amp's loss scaler uses it. 8-bit AdamW, FSDP and DeepSpeed
    decide on the host.
    """
    wrapped = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps ours
    from whisper_ft.compat import optimizer_skips_nonfinite_on_device

    return (optimizer_skips_nonfinite_on_device(wrapped)
            and accelerator.distributed_type.name not in ("FSDP", "DEEPSPEED"))


def finite(loss: float, grad_norm: float | None) -> bool:
    """A step worth its update: a finite loss and, where the gradients were clipped, a finite norm."""
    return math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))


def step_unless_nonfinite(optimizer, loss: torch.Tensor, grad_norm: torch.Tensor | None, on_device: bool) -> None:
    """optimizer.step(), skipped when the step's loss or gradient norm (equal on every process) is NaN/inf.

    on_device: the fused kernel is handed the flag and skips by itself (weights, moments and step count unchanged),
    so the host does not wait for the backward to finish before it queues the update (DESIGN: host syncs). Under
    fp16 the loss scaler hands it its own flag, which non-finite gradients set: a NaN/inf loss or norm has them.
    Otherwise both are read back here and the step is skipped by not calling it.
    """
    if not on_device:
        if finite(float(loss), None if grad_norm is None else float(grad_norm)):
            optimizer.step()
        return
    wrapped = optimizer.optimizer
    if optimizer.scaler is None:
        nonfinite = ~torch.isfinite(loss) if grad_norm is None else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        wrapped.found_inf = nonfinite.float()
    try:
        optimizer.step()
    finally:
        wrapped.__dict__.pop("found_inf", None)


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and LayerNorm weights (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "layer_norm" in name or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def keep_trainable_only(accelerator, cfg: Config) -> None:
    """Make save_state/load_state write and read only the trainable weights when some are frozen.

    The frozen weights are the base model's, which every run (and every resume) loads first, so a copy of
    them in each checkpoint is only disk space: for LoRA on large-v3, 6 GB per checkpoint instead of a few
    MB. The optimizer state already covers only the trainable weights. A full fine-tune keeps accelerate's
    format unchanged. With DeepSpeed or FSDP accelerate saves through its own path and these hooks are unused.
    """
    if not (cfg.lora_r > 0 or cfg.freeze_encoder):
        return
    from safetensors.torch import load_file

    from whisper_ft.checkpoint import CheckpointError

    def trainable(model) -> set[str]:
        return {name for name, p in model.named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        for model, state in zip(models, weights):
            keep = trainable(model)
            for name in [k for k in state if k not in keep]:
                del state[name]

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"{path} is missing")
            state = load_file(path, device=str(next(model.parameters()).device))
            missing = trainable(model) - state.keys()
            unexpected = state.keys() - dict(model.named_parameters()).keys()
            if missing or unexpected:  # a checkpoint of another mode (full, other LoRA targets)
                raise CheckpointError(f"{input_dir} does not hold this run's trainable weights ("
                                      f"{len(missing)} missing, e.g. {sorted(missing)[:2]}; {len(unexpected)} "
                                      f"unexpected, e.g. {sorted(unexpected)[:2]})")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here: accelerate's strict full-model load is skipped

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def exportable(unwrapped, cfg: Config, out: Path, lang):
    """The plain Whisper model to export: LoRA merged into the base weights, so no adapter code is needed
    to load it. With lora_save_adapter the adapter alone is saved first in out/adapter (peft's format).

    A base trained in bf16 (base_dtype) is loaded again in fp32 and the adapters are merged into that: the
    exported weights are the base's own plus the trained update, not their bf16 rounding.
    """
    if cfg.lora_r == 0:
        return unwrapped
    if cfg.lora_save_adapter:
        unwrapped.save_pretrained(out / "adapter", safe_serialization=True)
    if unwrapped.get_base_model().dtype != torch.float32:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from whisper_ft.model import load_whisper

        _, base = load_whisper(cfg.whisper_pretrained, lang, cfg.task, cache_dir=cfg.model_cache, token=cfg.hf_token)
        spec_augment(base.config, cfg)
        fresh = add_lora(base, cfg)
        adapter = {k: v.float().cpu() for k, v in get_peft_model_state_dict(unwrapped).items()}
        if set_peft_model_state_dict(fresh, adapter).unexpected_keys:
            raise RuntimeError("the trained LoRA weights do not fit a fresh copy of the base model")
        unwrapped = fresh
    return unwrapped.merge_and_unload()  # in place: the training model is not used after this
