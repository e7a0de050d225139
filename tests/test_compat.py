"""Each private name whisper_ft.compat reaches for exists in the installed torch, transformers and datasets (an
upgrade that moves one fails here, loudly), and each fallback does what compat says when the name is gone."""

from __future__ import annotations

import torch

from whisper_ft import compat


def test_sdpa_backend_choice_names_a_backend_and_falls_back_to_none(monkeypatch):
    assert callable(getattr(torch, "_fused_sdp_choice", None))
    q = torch.randn(1, 2, 8, 16)
    assert compat.sdpa_backend_choice(q, q, q) in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    monkeypatch.delattr(torch, "_fused_sdp_choice")
    assert compat.sdpa_backend_choice(q, q, q) is None


def test_compiled_graph_count_reads_dynamos_counters():
    from torch._dynamo.utils import counters

    before = compat.compiled_graph_count()
    counters["stats"]["unique_graphs"] += 2
    try:
        assert compat.compiled_graph_count() == before + 2
    finally:
        counters["stats"]["unique_graphs"] -= 2


def test_attention_implementation_of_a_loaded_model(tiny_model):
    from transformers import WhisperForConditionalGeneration

    config = WhisperForConditionalGeneration.from_pretrained(tiny_model, attn_implementation="eager").config
    assert "_attn_implementation" in dir(config) and compat.attention_implementation(config) == "eager"
    assert compat.attention_implementation(object()) == "unknown"


def test_the_fused_adamw_takes_found_inf_and_others_fall_back_to_the_host():
    fused = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    assert compat.optimizer_skips_nonfinite_on_device(fused)
    assert not compat.optimizer_skips_nonfinite_on_device(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))]))
    assert not compat.optimizer_skips_nonfinite_on_device(object())


def test_dataset_row_order_is_read_from_its_indices_mapping():
    from datasets import Dataset

    ds = Dataset.from_dict({"x": [1, 2, 3]})
    assert hasattr(ds, "_indices") and compat.dataset_rows_in_table_order(ds)
    assert not compat.dataset_rows_in_table_order(ds.select([2, 0]))
    assert not compat.dataset_rows_in_table_order(object())  # the name gone: read nothing from the table


def test_static_cache_classes_exist():
    classes = compat.static_cache_classes()
    assert classes is not None and [c.__name__ for c in classes] == ["EncoderDecoderCache", "StaticCache"]


def test_loader_workers_are_ended_at_once():
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True)
    it = iter(loader)
    next(it)
    assert callable(getattr(it, "_shutdown_workers", None))
    workers = list(it._workers)
    compat.shutdown_loader_workers(it)
    assert not any(w.is_alive() for w in workers)
    compat.shutdown_loader_workers(object())  # the name gone: nothing to do, no error
