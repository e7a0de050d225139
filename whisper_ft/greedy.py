"""Greedy decoding of 30-s clips for evaluation: Whisper's decoder stepped by a small loop over a static KV cache.

transformers' generate() spends most of each token outside the model: on an H200 (whisper-small shape, batch 32,
bf16, static cache, compiled step) a token took 5.2 ms of which the compiled decoder step was 1.75 ms; the rest is
some 290 small kernels and two host synchronisations per token (logits processors, stopping criteria, input
bookkeeping). This loop does the same greedy search with what it needs: the encoder once (evaluation hands over
the states it computed for its loss), the prompt in one forward that also fills the cross-attention cache, then
one decoder step per token, the suppressed tokens masked, and a check for "every row has ended" every
CHECK_EVERY tokens instead of every token.

It produces the token ids of generate(**model.generate_kwargs(...)) for short-form transcription without
timestamps: the prompt is the tokenizer's prefix (start, language, task, no-timestamps, as configured by
model.configure_language), the same max_length rule, suppress_tokens and begin_suppress_tokens. Anything else
(timestamps, beams, long-form, another transformers API) goes to generate(): see Greedy.supports.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

CHECK_EVERY = 8  # tokens between "have all rows ended?" checks: each check waits for the GPU


class Greedy:
    def __init__(self, model, prefix: list[int], generate_kwargs: dict[str, Any], rows: int = 0):
        """rows: pad smaller batches to this many rows (for a compiled step: one shape, one CUDA graph)."""
        from transformers import WhisperForConditionalGeneration

        from whisper_ft.config import MAX_TARGET_POSITIONS

        gen = model.generation_config
        self.model, self.prefix, self.rows = model, list(prefix), rows
        # generate() adds the prompt to max_length, capped at the decoder's positions (DESIGN: label length)
        self.total = min(generate_kwargs["max_length"] + len(self.prefix), MAX_TARGET_POSITIONS)
        self.eos = gen.eos_token_id if isinstance(gen.eos_token_id, int) else gen.eos_token_id[0]
        vocab = model.config.vocab_size
        self.suppress = torch.zeros(vocab, dtype=torch.bool)
        self.suppress[[t for t in gen.suppress_tokens or [] if t < vocab]] = True
        self.begin_suppress = self.suppress.clone()
        self.begin_suppress[[t for t in gen.begin_suppress_tokens or [] if t < vocab]] = True
        forward = inspect.signature(WhisperForConditionalGeneration.forward).parameters  # model may be a PeftModel
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"  # renamed within transformers 5
        self.caches: dict[tuple[int, int], Any] = {}
        self.compiled = torch.compile(self._logits, mode="reduce-overhead", dynamic=False) \
            if generate_kwargs.get("cache_implementation") == "static" and torch.cuda.is_available() else None

    @staticmethod
    def supports(model, generate_kwargs: dict[str, Any]) -> bool:
        """Plain greedy short-form decoding, which is what evaluation asks for; anything else is generate()'s."""
        gen = model.generation_config
        plain = set(generate_kwargs) <= {"max_length", "force_unique_generate_call", "language", "task",
                                         "cache_implementation"}
        from whisper_ft.compat import static_cache_classes

        return (plain and static_cache_classes() is not None and gen.num_beams in (None, 1) and not gen.do_sample and gen.decoder_start_token_id is not None
                and not getattr(gen, "return_timestamps", False) and getattr(gen, "no_speech_threshold", None) is None)

    def _logits(self, tokens, encoder_states, cache, positions):
        out = self.model(encoder_outputs=(encoder_states,), decoder_input_ids=tokens, decoder_position_ids=positions,
                         use_cache=True, **{self.cache_arg: cache})
        return out.logits[:, -1].float()

    def _cache(self, batch: int, frames: int):
        """An empty static cache for this batch size, the same one every time: a CUDA graph records the
        addresses of the cache it ran on, and a new cache per batch would record the graph again."""
        from whisper_ft.compat import static_cache_classes

        EncoderDecoderCache, StaticCache = static_cache_classes()
        if (batch, frames) in self.caches:
            self.caches[batch, frames].reset()
        else:
            text = self.model.config.get_text_config(decoder=True)  # as generate() builds its static cache
            self.caches[batch, frames] = EncoderDecoderCache(StaticCache(config=text, max_cache_len=self.total),
                                                             StaticCache(config=text, max_cache_len=frames))
        return self.caches[batch, frames]

    @torch.no_grad()
    def __call__(self, input_features: torch.Tensor, encoder_states: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, prompt + new tokens): the prompt, then greedy tokens; rows that ended hold EOS after it.

        encoder_states: the encoder's output for these features, when the caller has it (evaluation runs the
        encoder once for its loss and for this)."""
        from whisper_ft.collate import zero_rows

        # an eval set's last batch, or one with bad samples dropped: silent rows, ended from the start, rather
        # than a new shape that recompiles the step (DESIGN: recompiling on batch size)
        real, device = input_features.shape[0], input_features.device
        if encoder_states is None:
            encoder_states = self.model.get_encoder()(input_features).last_hidden_state
        encoder_states = zero_rows(encoder_states, self.rows)  # the padded rows are ended: their states are unread
        batch = encoder_states.shape[0]
        cache = self._cache(batch, encoder_states.shape[1])
        n = len(self.prefix)
        tokens = torch.tensor(self.prefix, device=device).expand(batch, n)
        # the prompt in one eager forward: it fills the self-attention cache up to n and the cross-attention cache
        positions = torch.arange(n, device=device).expand(batch, n)
        logits = self._logits(tokens, encoder_states, cache, positions)
        if self.suppress.device != device:  # once: a copy from pageable memory waits for the GPU
            self.suppress, self.begin_suppress = self.suppress.to(device), self.begin_suppress.to(device)
        step = self.compiled or self._logits
        out, ended = [tokens], torch.arange(batch, device=device) >= real
        for i in range(self.total - n):
            logits = logits.masked_fill(self.begin_suppress if i == 0 else self.suppress, float("-inf"))
            token = torch.where(ended, self.eos, logits.argmax(-1))
            out.append(token[:, None])
            ended |= token == self.eos
            if i + 1 == self.total - n or (i % CHECK_EVERY == CHECK_EVERY - 1 and bool(ended.all())):
                break
            positions = torch.full((batch, 1), n + i, device=device)
            logits = step(token[:, None], encoder_states, cache, positions)
            if self.compiled is not None:
                logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
        return torch.cat(out, dim=1)[:real]


class Decoding:
    """features -> token ids for one evaluation: Greedy where it covers the settings, else generate().

    rows: the loader's batch size; with a compiled step (cache_implementation "static") every batch is padded
    to it. One Greedy per model and settings, kept on the model, so a compiled step is compiled once per run,
    not once per evaluation. If Greedy fails (a transformers release that changed the decoder's interface),
    evaluation warns once and goes on with generate(): slower, the same transcripts.
    """

    def __init__(self, model, tokenizer, generate_kwargs: dict[str, Any], rows: int = 0):
        self.model, self.generate_kwargs, self.greedy = model, generate_kwargs, None
        if Greedy.supports(model, generate_kwargs):
            rows = rows if generate_kwargs.get("cache_implementation") == "static" else 0
            key = (tuple(tokenizer.prefix_tokens), tuple(sorted(generate_kwargs.items())), rows)
            made = model.__dict__.setdefault("_whisper_ft_greedy", {})
            if key not in made:
                made[key] = Greedy(model, tokenizer.prefix_tokens, generate_kwargs, rows)
            self.key, self.made = key, made
            self.greedy = made[key]

    def __call__(self, features: torch.Tensor, encoder_states: torch.Tensor | None = None) -> torch.Tensor:
        if self.greedy is not None:
            try:
                return self.greedy(features, encoder_states)
            except Exception as e:  # noqa: BLE001 - any failure of our loop; generate() raises real input errors again
                import warnings

                self.greedy = self.made[self.key] = None
                warnings.warn(f"greedy decoding failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "evaluating with generate() instead", stacklevel=1)
        mask = torch.ones(features.shape[::2], dtype=torch.long, device=features.device)
        return self.model.generate(input_features=features, attention_mask=mask, **self.generate_kwargs)

    def close(self) -> None:
        """Free the static caches: training needs the memory back (large-v3 at batch 32: 8 GB of
        cross-attention cache). The next evaluation allocates them again and records the CUDA graph once more."""
        if self.greedy is not None:
            self.greedy.caches.clear()
