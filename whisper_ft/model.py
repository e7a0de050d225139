"""Load a Whisper checkpoint and make it speak one language: tokenizer prefix and generation config."""

from __future__ import annotations

import logging
import re

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
                 attn_implementation: str | None = None):
    """(processor, model) with language and task set in both places that matter (DESIGN pitfall 3)."""
    try:
        processor = WhisperProcessor.from_pretrained(pretrained, cache_dir=cache_dir or None, token=token or None)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = WhisperForConditionalGeneration.from_pretrained(pretrained, cache_dir=cache_dir or None,
                                                                token=token or None, **extra)
    except (OSError, ValueError) as e:  # ValueError: a path that does not exist reads as a malformed Hub id
        raise ModelError(f"could not load Whisper from {pretrained!r}: {str(e).splitlines()[0][:300]} "
                         "(a Hub id like openai/whisper-small, or a folder with config.json and the weights)") from None
    configure_language(processor, model, lang, task)
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
    """Greedy decoding whose prefix + new tokens stay within max_length and Whisper's 448 (pitfall 1)."""
    kwargs = {"max_length": min(max_length, MAX_TARGET_POSITIONS)}  # counts the prefix, as in Seq2SeqTrainer
    if is_multilingual(model):
        kwargs.update(language=model.generation_config.language, task=model.generation_config.task)
    return kwargs
