"""Model card and Hub upload of the exported model folder only (never checkpoints or optimizer state)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

# What a model folder needs, and nothing of the training state beside it (DESIGN pitfall 12).
ALLOW = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
         "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
         "normalizer.json", "README.md"]


def write_model_card(out: Path, cfg, lang, state: dict[str, Any]) -> Path:
    import torch
    import transformers

    base, best = state.get("base_metrics") or {}, state.get("best_metric")
    final = {"wer": best} if cfg.metric_for_best_model == "wer" else {}
    results = []
    for name, value in (("wer", final.get("wer")), ):
        if value is not None:
            results.append({"task": {"type": "automatic-speech-recognition", "name": "Speech recognition"},
                            "dataset": {"name": cfg.dataset_name, "type": cfg.dataset_name,
                                        "config": cfg.dataset_config or None, "split": cfg.eval_split},
                            "metrics": [{"type": "wer", "value": round(value, 2), "name": "WER"}]})
    meta = {"language": [lang.code], "license": "apache-2.0", "base_model": cfg.whisper_pretrained,
            "library_name": "transformers", "pipeline_tag": "automatic-speech-recognition",
            "tags": ["whisper", "whisper-ft"],
            "model-index": [{"name": cfg.checkpoint_name, "results": results}]}
    hours = state.get("audio_seconds_seen", 0.0) / 3600
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    text = f"""---
{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()}
---

# {cfg.checkpoint_name}

{cfg.whisper_pretrained} fine-tuned to {cfg.task} {lang.name.title()} speech with whisper-ft.

| | base model | fine-tuned |
|---|---|---|
| WER (normalised, %) | {fmt(base.get('eval_wer'))} | {fmt(best if cfg.metric_for_best_model == 'wer' else None)} |
| CER (%) | {fmt(base.get('eval_cer'))} | |
| orthographic WER (%) | {fmt(base.get('eval_wer_ortho'))} | |

Evaluated on `{cfg.dataset_name}` split `{cfg.eval_split}`; trained on split `{cfg.train_split}`.

## Training

- steps: {state.get('step')} optimizer steps, {state.get('samples_seen')} samples, {hours:.2f} hours of audio
- learning rate {cfg.learning_rate} ({cfg.lr_scheduler_type}, {cfg.warmup_steps} warmup steps),
  batch {cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} accumulation per device
- precision: {'fp16' if cfg.fp16 else 'bf16' if cfg.bf16 else 'fp32'}; seed {cfg.seed}
- transformers {transformers.__version__}, torch {torch.__version__}

## Use

```python
from transformers import pipeline
asr = pipeline("automatic-speech-recognition", model="{cfg.hub_model_id or cfg.checkpoint_name}")
print(asr("audio.mp3")["text"])
```
"""
    path = out / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def push(folder: Path, cfg, attempts: int = 3) -> str:
    """Create the repo and upload the allow-listed files; retries transient failures."""
    from huggingface_hub import HfApi

    api = HfApi(token=cfg.hf_token)
    repo_id = cfg.hub_model_id or f"{api.whoami()['name']}/{cfg.checkpoint_name}"
    for attempt in range(1, attempts + 1):
        try:
            api.create_repo(repo_id, private=cfg.hub_private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=ALLOW,
                              commit_message=f"whisper-ft: {cfg.checkpoint_name} step {cfg.max_steps}")
            return f"{api.endpoint}/{repo_id}"
        except Exception:
            if attempt == attempts:
                raise
            time.sleep(2 ** attempt)
    raise AssertionError("unreachable")
