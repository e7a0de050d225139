"""Collator, schedule, metrics and checkpoint rotation: the small parts, each on known inputs."""

import json

import numpy as np
import pytest

from whisper_ft import checkpoint
from whisper_ft.collate import IGNORE_INDEX, Collator
from whisper_ft.data import Bad
from whisper_ft.evaluation import error_rates, normalize
from whisper_ft.schedule import lr_at


def sample(i, labels):
    return {"id": str(i), "input_features": np.zeros((80, 3000), np.float32), "labels": labels, "seconds": 1.0}


def test_collator_strips_one_start_token_and_pads_with_ignore_index():
    sot, eot = 50, 49
    batch = Collator(decoder_start_token_id=sot)([sample(0, [sot, 7, 8, 9, eot]), Bad("x", "missing file"),
                                                  sample(1, [sot, 7, eot])])
    assert batch["labels"].tolist() == [[7, 8, 9, eot], [7, eot, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_features"].shape == (2, 80, 3000)
    assert batch["ids"] == ["0", "1"] and [b.id for b in batch["bad"]] == ["x"]


@pytest.mark.slow
def test_collator_with_real_tokenizer_gives_one_start_token_to_the_model(tiny_model):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    from whisper_ft.languages import resolve
    from whisper_ft.model import configure_language

    processor = WhisperProcessor.from_pretrained(tiny_model)
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    configure_language(processor, model, resolve("as"), "transcribe")
    ids = processor.tokenizer("মই ভাত খাওঁ").input_ids
    labels = Collator(model.config.decoder_start_token_id)([sample(0, ids)])["labels"]
    decoder_in = shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)[0]
    sot = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    assert decoder_in.tolist().count(sot) == 1
    assert processor.tokenizer.convert_ids_to_tokens(decoder_in[:4].tolist()) == [
        "<|startoftranscript|>", "<|as|>", "<|transcribe|>", "<|notimestamps|>"]


@pytest.mark.parametrize("step,expected", [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0), (150, 0.0)])
def test_linear_warmup_then_decay(step, expected):
    assert lr_at(step, peak=1.0, warmup_steps=10, max_steps=100) == pytest.approx(expected)


def test_other_schedules():
    assert lr_at(50, peak=2.0, warmup_steps=10, max_steps=100, kind="constant_with_warmup") == 2.0
    assert lr_at(55, peak=1.0, warmup_steps=10, max_steps=100, kind="cosine") == pytest.approx(0.5)


def test_normalisation_keeps_combining_marks():
    assert normalize("মই ভাত খাওঁ।") == "মই ভাত খাওঁ"  # the candrabindu stays, the danda goes
    assert normalize("Hello, World!") == "hello world"


def test_error_rates_on_known_strings():
    m = error_rates(["the cat sat down", "open the door", ""], ["the cat sat", "open a door", "noise"])
    assert m["eval_samples"] == 3 and m["eval_empty_references"] == 1
    assert m["eval_wer"] == pytest.approx(100 * 2 / 7)  # one deletion + one substitution over 7 words
    assert m["eval_cer"] == pytest.approx(100 * (5 + 3) / (16 + 13))
    ortho = error_rates(["Open the door."], ["open the door"])
    assert ortho["eval_wer"] == 0 and ortho["eval_wer_ortho"] == pytest.approx(100 * 2 / 3)


def fake_checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    if complete:
        (path / checkpoint.COMPLETE).write_text(str(step))
    return path


def test_prune_sorts_numerically_and_keeps_best_and_resumed(tmp_path):
    for step in (9, 10, 100, 200, 1000):
        fake_checkpoint(tmp_path, step)
    removed = checkpoint.prune(tmp_path, limit=2, keep={tmp_path / "checkpoint-9", tmp_path / "checkpoint-100"})
    assert sorted(p.name for p in removed) == ["checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100", "checkpoint-1000", "checkpoint-200",
                                                          "checkpoint-9"]


def test_resume_skips_incomplete_and_unreadable(tmp_path):
    messages = []
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10, complete=False)
    broken = fake_checkpoint(tmp_path, 8)
    (broken / checkpoint.STATE_FILE).write_text("{not json")
    assert checkpoint.find_resumable(tmp_path, messages.append).name == "checkpoint-5"
    assert any("checkpoint-10: incomplete" in m for m in messages)
    assert any("checkpoint-8: unreadable" in m for m in messages)


def test_checkpoints_found_but_none_readable_is_an_error(tmp_path):
    fake_checkpoint(tmp_path, 10, complete=False)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to start over"):
        checkpoint.find_resumable(tmp_path, lambda m: None)


def real_checkpoint(root, step):
    """A checkpoint with the file kinds accelerate writes: safetensors weights, torch-saved optimizer and RNG."""
    import torch
    from safetensors.torch import save_file

    path = fake_checkpoint(root, step)
    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8)},
              str(path / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}, "param_groups": []}, path / "optimizer.bin")
    torch.save({"torch": torch.get_rng_state()}, path / "random_states_0.pkl")
    return path


@pytest.mark.parametrize("name,damage", [
    ("model.safetensors", lambda b: b[: len(b) - 100]),  # truncated weights
    ("model.safetensors", lambda b: b[:5]),  # not even a header length
    ("model.safetensors", lambda b: b[:8] + b"\0" * (len(b) - 8)),  # header zeroed
    ("optimizer.bin", lambda b: b[: len(b) // 2]),
    ("random_states_0.pkl", lambda b: b[:100]),
    ("trainer_state.json", lambda b: b[:3]),
])
def test_a_checkpoint_with_an_unreadable_file_is_named_and_skipped_never_deleted(tmp_path, name, damage):
    real_checkpoint(tmp_path, 2)
    newest = real_checkpoint(tmp_path, 4)
    assert checkpoint.unreadable_file(newest) is None
    (newest / name).write_bytes(damage((newest / name).read_bytes()))
    messages = []
    assert checkpoint.find_resumable(tmp_path, messages.append).name == "checkpoint-2"
    assert len(messages) == 1 and messages[0].startswith(f"skipping checkpoint-4: unreadable ({name}")
    assert (newest / name).is_file()


def test_a_checkpoint_that_fails_to_load_falls_back_to_the_older_one(tmp_path):
    real_checkpoint(tmp_path, 2)
    real_checkpoint(tmp_path, 4)

    class Accelerator:
        loaded = []

        def load_state(self, path):
            if path.endswith("checkpoint-4"):
                raise RuntimeError("safetensors_rust.SafetensorError: invalid tensor data\nmore")
            self.loaded.append(path)

    messages = []
    path, state = checkpoint.resume(Accelerator(), tmp_path, messages.append)
    assert path.name == "checkpoint-2" and state == {"step": 2} and Accelerator.loaded == [str(path)]
    assert messages == ["skipping checkpoint-4: could not be loaded (RuntimeError: safetensors_rust.SafetensorError: "
                        "invalid tensor data)"]
