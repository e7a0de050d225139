"""Every use of a private name of torch, transformers or datasets, in one place.

Each function says what it reaches for and what it does when the name is gone (its fallback): a detail of a
report is lost, or a slower path is taken, but nothing breaks. tests/test_compat.py asserts that every name
still exists in the installed versions, so an upgrade that moves one fails a test loudly instead of silently
degrading a run (a per-step GPU sync, wrong compile counts, record ids without file names).
"""

from __future__ import annotations

from typing import Any


def sdpa_backend_choice(q, k, v) -> str | None:
    """The backend scaled_dot_product_attention picks for these inputs ("FLASH_ATTENTION", "EFFICIENT_ATTENTION",
    "CUDNN_ATTENTION", "MATH"): torch's private `_fused_sdp_choice`. Fallback: None (the start-up line then names
    the attention implementation without its kernel)."""
    import torch
    from torch.nn.attention import SDPBackend

    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return None
    try:
        return SDPBackend(choose(q, k, v)).name
    except (RuntimeError, TypeError, ValueError):
        return None


def compiled_graph_count() -> int | None:
    """Graphs torch.compile has built in this process: `torch._dynamo.utils.counters["stats"]["unique_graphs"]`.
    Fallback: None (the compile statistics in metrics.jsonl are left out rather than reported as 0)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"].get("unique_graphs", 0))


def attention_implementation(config) -> str:
    """The attention a loaded transformers model runs (sdpa, eager, flash_attention_2): its config's private
    `_attn_implementation`. Fallback: "unknown" (only the start-up line uses it)."""
    return getattr(config, "_attn_implementation", None) or "unknown"


def optimizer_skips_nonfinite_on_device(optimizer) -> bool:
    """Whether torch's optimizer takes a found_inf tensor in step() (the fused AdamW does, for torch.amp's loss
    scaler): its private `_step_supports_amp_scaling`. Fallback: False, so a NaN/inf step is detected on the host
    (one read-back per step: slower on a GPU, still correct)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def dataset_rows_in_table_order(ds) -> bool:
    """Whether a datasets Dataset's rows are its Arrow table's rows in order (no select/shuffle indices mapping),
    so that the file names of its audio column can be read from the table at once: its private `_indices`.
    Fallback: False (records are then named by row number only)."""
    return getattr(ds, "_indices", "missing") is None


def static_cache_classes() -> tuple[Any, Any] | None:
    """transformers' EncoderDecoderCache and StaticCache (transformers.cache_utils, which moves between releases),
    for the greedy evaluation loop's fixed-shape cache. Fallback: None, and evaluation decodes with generate()."""
    try:
        from transformers.cache_utils import EncoderDecoderCache, StaticCache
    except ImportError:
        return None
    return EncoderDecoderCache, StaticCache


def shutdown_loader_workers(iterator) -> None:
    """End a DataLoader iterator's worker processes now: torch's private `_shutdown_workers`. Fallback: drop the
    reference and let the iterator's __del__ do the same, which it does at once unless a reference cycle or a
    traceback still holds the iterator."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
