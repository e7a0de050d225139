"""The real entry point, end to end: resume exactness, two processes, the exported model, learning."""

import pytest

import torch
from safetensors.torch import load_file

from conftest import CV_EN, base_config, metrics, run_train, straight_and_resumed, torchrun, train_rows


def test_resume_is_step_exact_with_accumulation(tiny_model, tmp_path):
    """6 steps straight == 2 + resume + 2 + resume + 2: same losses, LRs and final weights, bit for bit."""
    cfg = dict(gradient_accumulation_steps=2, save_steps=2, eval_steps=2, max_steps=6, save_total_limit=0)
    straight, resumed, _, proc = straight_and_resumed(tiny_model, tmp_path, cfg, (2, 4, 6))
    assert "stop_at_step 4 -> 6" in proc.stderr
    assert train_rows(straight) == train_rows(resumed)
    assert len(train_rows(straight)) == 6
    a = load_file(straight / "checkpoint-6" / "model.safetensors")
    b = load_file(resumed / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_changed_model_on_resume_is_refused(tiny_model, tiny_model_en, tmp_path):
    out = tmp_path / "run"
    assert run_train(base_config(tiny_model, out, max_steps=3), tmp_path).returncode == 0
    proc = run_train(base_config(tiny_model_en, out, max_steps=6), tmp_path)
    assert proc.returncode == 2
    assert "belong to a different run: whisper_pretrained was" in proc.stderr and "new checkpoint_name" in proc.stderr


@pytest.mark.slow
def test_two_processes_count_each_eval_sample_once_and_share_the_schedule(tiny_model, tmp_path):
    """torchrun x2 on CPU: 7 eval samples split 4+3 are all counted once; LR per step equals 1 process."""
    cfg = dict(max_steps=4, eval_steps=4, save_steps=4, predict_with_generate=True, max_eval_samples=7,
               generation_max_length=12, per_device_train_batch_size=2, metric_for_best_model="wer")
    two, one = tmp_path / "two", tmp_path / "one"
    proc = run_train(base_config(tiny_model, two, **cfg), tmp_path,
                     launcher=torchrun(), env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc1 = run_train(base_config(tiny_model, one, **cfg, gradient_accumulation_steps=2), tmp_path)
    assert proc1.returncode == 0, proc1.stderr[-3000:]
    evals = [r for r in metrics(two) if "eval_wer" in r]
    assert [r["eval_samples"] for r in evals] == [7]
    assert [r[2] for r in train_rows(two)] == [r[2] for r in train_rows(one)]
    # 2 processes x batch 2 see the same 4 samples per step as 1 process x batch 2 x accumulation 2
    assert [r["epoch"] for r in metrics(two) if "loss" in r] == [r["epoch"] for r in metrics(one) if "loss" in r]


@pytest.mark.slow
def test_final_model_reloads_cleanly_with_language_and_task(tiny_model, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, lang="as", dataset_name=str(CV_EN.parent / "cv-as"), max_steps=2,
                      save_steps=2, eval_steps=2)
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline
    from transformers.utils import logging

    logging.enable_propagation()
    with caplog.at_level("WARNING"):
        model, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())
    assert "proj_out" not in caplog.text
    assert model.generation_config.language == "as" and model.generation_config.task == "transcribe"
    assert model.generation_config.forced_decoder_ids is None
    processor = WhisperProcessor.from_pretrained(out)
    assert processor.tokenizer.prefix_tokens[1] == processor.tokenizer.convert_tokens_to_ids("<|as|>")
    asr = pipeline("automatic-speech-recognition", model=str(out))
    import numpy as np
    assert isinstance(asr({"raw": np.zeros(16000, np.float32), "sampling_rate": 16000}, generate_kwargs={"max_new_tokens": 5})["text"], str)
    card = (out / "README.md").read_text()
    assert "model-index" in card and "base_model:" not in card  # a local base: no Hub id to name
    assert str(tiny_model) not in card.split("---")[1] and "Fine-tuned from a local model" in card
    # Older transformers and other tools read preprocessor_config.json, not processor_config.json.
    import shutil
    old = tmp_path / "old-names"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("checkpoint-*", "processor_config.json"))
    assert (old / "preprocessor_config.json").is_file() and not (old / "processor_config.json").exists()
    older = WhisperProcessor.from_pretrained(old)
    assert older.feature_extractor.to_dict() == processor.feature_extractor.to_dict()
    assert older.tokenizer("hello").input_ids == processor.tokenizer("hello").input_ids
    kept = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in kept and "metrics.jsonl" in kept


@pytest.mark.slow
def test_missing_dataset_is_one_clear_error(tiny_model, tmp_path):
    proc = run_train(base_config(tiny_model, tmp_path / "x", dataset_name=str(tmp_path / "nope.csv")), tmp_path)
    assert proc.returncode == 1
    assert "manifest" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_wer_falls_from_100_to_under_30(learned_run):
    """The demo's recipe: a random-init tiny Whisper learns to read the committed clips."""
    out, proc, _ = learned_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in metrics(out) if "eval_wer" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_wer"] >= 90
    assert evals[-1]["step"] == 150 and evals[-1]["eval_wer"] < 30, evals
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert losses[-1] < losses[0] / 4
    assert "wer: base model" in proc.stderr


def parquet_copy(folder):
    """A local stand-in for a Hub dataset: the English clips as a parquet file with an Audio column."""
    import datasets

    from whisper_ft.sources import load_records

    for split, name in (("train", "train"), ("dev", "validation")):
        recs = load_records(str(CV_EN), split)
        ds = datasets.Dataset.from_dict({"audio": [{"bytes": open(r.path, "rb").read(), "path": r.id} for r in recs],
                                         "sentence": [r.text for r in recs]}).cast_column("audio", datasets.Audio())
        (folder / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    return folder


@pytest.mark.slow
def test_streaming_resume_is_step_exact_across_epochs(tiny_model, tmp_path):
    """Streamed data: 8 steps straight == 4 + resume + 4, across an epoch boundary (25 rows, 3 per step)."""
    data = parquet_copy(tmp_path / "pq")
    cfg = dict(dataset_name=str(data), streaming=True, eval_split="validation", per_device_train_batch_size=3,
               max_steps=12, save_steps=4, eval_steps=100, save_total_limit=0)
    straight, resumed, _, _ = straight_and_resumed(tiny_model, tmp_path, cfg, (5, 12))
    assert train_rows(straight) == train_rows(resumed) and len(train_rows(straight)) == 12
    a = load_file(straight / "checkpoint-12" / "model.safetensors")
    b = load_file(resumed / "checkpoint-12" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
