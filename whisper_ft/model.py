"""Load a Whisper checkpoint and make it speak one language: tokenizer prefix and generation config.

Loads from a Hub id, a model folder, or a training run's checkpoint-<step>/ folder; every command reports
a model that will not load with the same message (load_error).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import WhisperForConditionalGeneration, WhisperProcessor

from whisper_ft.config import MAX_TARGET_POSITIONS


class ModelError(Exception):
    pass


class _WhisperInternalKwargs(logging.Filter):
    """Drop transformers' "Passing `generation_config` together with generation-related arguments" warning when
    the arguments are only suppress_tokens/begin_suppress_tokens: Whisper's own generate() passes those beside
    the generation config (transformers 5.x, generation_whisper.py); nothing a caller passes causes it or can
    avoid it. The same warning about any other argument, one of ours, still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Passing `generation_config` together with generation-related" not in message:
            return True
        named = re.search(r"arguments=\(\{(.*?)\}\)", message)
        return not named or not set(re.findall(r"'(\w+)'", named.group(1))) <= {"suppress_tokens",
                                                                                "begin_suppress_tokens"}


logging.getLogger("transformers.generation.utils").addFilter(_WhisperInternalKwargs())


def load_whisper(pretrained: str, lang, task: str, *, cache_dir: str = "", token: str = "",
                 attn_implementation: str | None = None, dtype=None):
    """(processor, model) with language and task set in both places that matter
    (DESIGN: language and task in two places).

    The weights come in fp32 unless dtype says otherwise, whatever the checkpoint stores: transformers 5 would
    load large-v3 and large-v3-turbo (stored in fp16) as fp16, and a run would then train fp16 weights
    (DESIGN: checkpoint dtype)."""
    import torch

    processor = from_pretrained(WhisperProcessor, pretrained, cache_dir=cache_dir or None, token=token or None)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = from_pretrained(WhisperForConditionalGeneration, pretrained, cache_dir=cache_dir or None,
                            token=token or None, dtype=dtype or torch.float32, **extra)
    configure_language(processor, model, lang, task)
    return processor, model


def looks_like_path(ref: str) -> bool:
    """A name the user meant as a local folder (not a Hub id like openai/whisper-small)."""
    return ref.startswith((".", "/", "~", "\\")) or ref.count("/") > 1 or "\\" in ref or ref.endswith("/")


def offline() -> bool:
    import os

    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                    "TRANSFORMERS_OFFLINE"))


def from_pretrained(cls, ref: str, **kwargs):
    """cls.from_pretrained(ref, **kwargs), or a ModelError that every command reports the same way.

    A model whose weights do not fit the class (another architecture's, or missing tensors) is refused here:
    transformers would only warn and fill the gaps with random weights.
    """
    path = Path(ref).expanduser()
    if not path.exists() and looks_like_path(ref):
        raise load_error(ref, f"no such folder ({path.resolve()} does not exist)")
    if path.is_file():
        raise load_error(ref, "it is a file; give the folder that holds it")
    info = {"output_loading_info": True} if cls is WhisperForConditionalGeneration else {}
    try:
        loaded = cls.from_pretrained(ref, **kwargs, **info)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors' and torch's own errors for a bad file
        reason = " ".join(str(e).split()) or type(e).__name__
        if not path.exists() and offline() and isinstance(e, OSError):
            raise load_error(ref, "it is not in the model cache and HF_HUB_OFFLINE=1 forbids downloading it; run "
                             f"once online (or `hf download {ref}`), set model_cache to where it is cached, or "
                             "give a local model folder") from None
        if len(reason) > 400:
            reason = reason[:400].rsplit(" ", 1)[0] + " ..."
        raise load_error(ref, f"{type(e).__name__}: {reason}") from None
    if not info:
        return loaded
    model, loading = loaded
    missing = set(loading.get("missing_keys", ())) - {"proj_out.weight"}  # tied to the decoder embeddings
    mismatched = loading.get("mismatched_keys", ())
    if missing or mismatched:
        raise load_error(ref, f"its weights are not a Whisper's of this shape ({len(missing)} missing, e.g. "
                         f"{', '.join(sorted(missing)[:3]) or '-'}; {len(mismatched)} of another shape): another "
                         "architecture's weights, or an incomplete model folder")
    return model


def load_error(ref: str, reason: str) -> ModelError:
    """The one message for a Whisper that cannot be loaded from ref (a Hub id or a folder), and why."""
    return ModelError(f"could not load Whisper from {ref!r}: {reason} "
                      "(a Hub id like openai/whisper-small, or a folder with config.json and the weights)")


def is_training_checkpoint(path: Path) -> bool:
    """A checkpoint-<step>/ folder: accelerate's save_state, with no config.json beside the weights."""
    return path.is_dir() and (path / "trainer_state.json").is_file() and not (path / "config.json").is_file()


def load_any(ref: str, cfg, lang):
    """(processor, model) with the config's language and task, from a model folder, Hub id or checkpoint."""
    path = Path(ref).expanduser()
    if not is_training_checkpoint(path):
        return load_whisper(ref, lang, cfg.task, cache_dir=cfg.model_cache, token=cfg.hf_token)
    return load_training_checkpoint(path, cfg, lang)


def load_training_checkpoint(path: Path, cfg, lang):
    """The architecture and processor of the run's base model, with the checkpoint's weights.

    save_state writes the raw state dict, where safetensors dropped proj_out.weight (tied to the decoder
    embeddings, DESIGN: tied output projection): load non-strictly, allow only tied keys to be missing, then re-tie.
    """
    import torch
    from safetensors.torch import load_file

    from whisper_ft.checkpoint import unreadable_file

    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path / 'trainer_state.json'} cannot be read ({e}); evaluate another checkpoint or the "
                         "run's final model folder") from None
    if not isinstance(state, dict) or not isinstance(state.get("config", {}), dict):
        raise ModelError(f"{path / 'trainer_state.json'} is not a run state (it holds a JSON "
                         f"{type(state).__name__}); evaluate another checkpoint or the run's final model folder")
    saved = state.get("config", {})
    base = saved.get("whisper_pretrained") or cfg.whisper_pretrained
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{path} has no model.safetensors (sharded FSDP/DeepSpeed state?); export a model folder "
                         "from it first, or evaluate the run's final model folder")
    if (saved.get("lora_r") or 0) > 0:  # adapter weights only: the base + adapter is the run's final folder
        raise ModelError(f"{path} is a LoRA checkpoint: it holds only the adapter weights, not a whole model. "
                         f"Evaluate the run's final model folder ({path.parent}, written at the end of training with "
                         "the adapter merged), or finish the run first")
    problem = unreadable_file(path)
    if problem:
        raise ModelError(f"{path} cannot be read: {problem}")
    processor, model = load_whisper(base, lang, cfg.task, cache_dir=cfg.model_cache, token=cfg.hf_token)
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise ModelError(f"{weights} cannot be read ({type(e).__name__}: {e})") from None
    tensors = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in tensors.items()}
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise ModelError(f"{weights} does not match the architecture of {base}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    tied = {"proj_out.weight"}
    if saved.get("freeze_encoder"):  # a frozen encoder is not saved: the base model's, loaded above, is the run's
        tied |= {k for k in result.missing_keys if k.startswith("model.encoder.")}
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ModelError(f"{weights} does not match the architecture of {base}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
    if not torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight):
        raise ModelError(f"proj_out is not tied to the decoder embeddings after loading {weights}")
    return processor, model


def is_multilingual(model) -> bool:
    return bool(getattr(model.generation_config, "is_multilingual", False)) and bool(
        getattr(model.generation_config, "lang_to_id", None))


def configure_language(processor, model, lang, task: str) -> None:
    tokenizer, gen = processor.tokenizer, model.generation_config
    if not is_multilingual(model):
        if lang.code != "en" or task != "transcribe":
            raise ModelError(f"this checkpoint is English-only (like *.en); it cannot {task} {lang.name}. "
                             "Use a multilingual checkpoint (without .en) or lang: en")
        tokenizer.set_prefix_tokens(language=None, task=None)
    else:
        if lang.token not in gen.lang_to_id:
            raise ModelError(f"this checkpoint has no {lang.token} token for {lang.name}")
        tokenizer.set_prefix_tokens(language=lang.code, task=task)
        gen.language, gen.task = lang.code, task
    # Fixed ids would override language/task at generate(); the model would then detect languages per sample.
    gen.forced_decoder_ids = None
    model.config.forced_decoder_ids = None
    gen.max_length = MAX_TARGET_POSITIONS


def generate_kwargs(model, max_length: int) -> dict:
    """Greedy decoding of one clip (30 s at most) into at most max_length new tokens (DESIGN: one decoding pass).

    transformers' Whisper generate() adds the prefix length to max_length itself (capped at the decoder's
    448 positions: DESIGN: label length), and without force_unique_generate_call it decodes the clip again
    from the last timestamp token a prediction contains, gluing the passes into one longer transcript.
    """
    kwargs = {"max_length": min(max_length, MAX_TARGET_POSITIONS), "force_unique_generate_call": True}
    if is_multilingual(model):
        kwargs.update(language=model.generation_config.language, task=model.generation_config.task)
    return kwargs
