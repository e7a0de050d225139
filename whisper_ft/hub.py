"""Model card and Hub upload of the exported model folder only (never checkpoints or optimizer state).

write_model_card(out, cfg, lang, state) writes out/README.md: base model, language, data and splits,
hyperparameters, steps and hours of audio, WER/CER of the base and of the fine-tuned model (read
from metrics.jsonl, also as `model-index` metadata the Hub renders), framework versions, usage.
push(folder, cfg) creates the repo (private when hub_private), uploads the allow-listed files in one
commit, retries transient failures (network errors, HTTP 5xx/429) and returns the repo URL. The token
is only ever handed to huggingface_hub: it is never printed, and it is masked in error messages.
"""

from __future__ import annotations

import fnmatch
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import yaml

from whisper_ft.config import eval_set_specs
from whisper_ft.model import ModelError

# What a model folder needs, and nothing of the training state beside it (DESIGN: uploading the output folder).
ALLOW = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
         "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
         "normalizer.json", "README.md"]
LOGS = "runs"  # TensorBoard event files, uploaded only when asked: the Hub shows them as training metrics
RETRY_WAIT_S = 2.0  # doubled after each failed attempt
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(ModelError):
    """The upload failed. A ModelError, so that train_loop reports it in one line with exit code 1."""


# ---------------------------------------------------------------------------------------------
# Model card


def write_model_card(out: Path, cfg, lang, state: dict[str, Any]) -> Path:
    path = Path(out) / "README.md"
    path.write_text(model_card(cfg, lang, state, read_evals(Path(out))), encoding="utf-8")
    return path


def read_evals(out: Path) -> list[dict[str, Any]]:
    """The evaluation lines of metrics.jsonl (one per evaluation, by step)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    from whisper_ft.metrics_log import read_rows

    return [r for r in read_rows(path) if "eval_loss" in r or "eval_wer" in r]


def exported_metrics(cfg, state: dict[str, Any], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation of the model that was exported: the merge_base pick's, else the best step's when
    load_best_model_at_end, else the last."""
    merged = [r for r in evals if "merge_alpha" in r]
    if merged:
        return merged[-1]
    step = state.get("best_step") if cfg.load_best_model_at_end and state.get("best_step") is not None \
        else state.get("step")
    at_step = [r for r in evals if r.get("step") == step]
    return at_step[-1] if at_step else {}


def merge_section(final: dict[str, Any]) -> str:
    """merge_base's table for the model card: each alpha's metric on every evaluation set, and the pick."""
    if "merge_alpha" not in final:
        return ""
    rows = final.get("merge_table") or []
    sets = [k for k in rows[0] if k != "alpha"] if rows else []
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = "\n".join(f"| {r['alpha']:g}{' (base)' if r['alpha'] == 0 else ''} | " + " | ".join(fmt(r.get(s)) for s in sets)
                      + " |" for r in rows)
    return f"""
### Merged with the base model

The exported weights are theta_base + alpha (theta_fine-tuned - theta_base) (WiSE-FT), {final.get('merge_metric', '')}
on each evaluation set:

| alpha | {' | '.join(sets)} |
|---|{'---|' * len(sets)}
{lines}

Chosen: {final.get('merge_reason', '')}.
"""


def hub_id(ref: str) -> str | None:
    """ref as a Hub model/dataset id, or None for a local path (the Hub rejects those in metadata)."""
    if not ref or Path(ref).expanduser().exists():
        return None
    return ref if HUB_ID.match(ref) else None


def base_model_id(ref: str) -> str | None:
    """The Hub id of the base model, also for a local copy of one (a Hub cache snapshot or a saved config)."""
    if hub_id(ref):
        return ref
    path = Path(ref).expanduser()
    m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(path.resolve()) + "/")
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    try:
        origin = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path", "")
    except (OSError, ValueError):
        return None
    return origin if isinstance(origin, str) and hub_id(origin) else None


def worse_than_base(cfg, base: dict[str, Any], final: dict[str, Any]) -> str | None:
    """A plain warning when the exported model scores worse than the base model did, with what to change."""
    key = "eval_" + cfg.metric_for_best_model
    before, after = base.get(key), final.get(key)
    if before is None or after is None or after == before or (after > before) == cfg.greater_is_better:
        return None
    return (f"the fine-tuned model is worse than the base model: {cfg.metric_for_best_model} {before:.2f} before "
            f"fine-tuning, {after:.2f} after (step {final.get('step')}). Try a lower learning_rate (now "
            f"{cfg.learning_rate:g}; e.g. {cfg.learning_rate / 3:.1g}), fewer max_steps if the evaluations got worse "
            "as training went on, more max_steps or warmup_steps if they were still improving, or more (and "
            f"more varied) training data. The base model {_shown(cfg.whisper_pretrained)} may serve you better as it is.")


def _shown(ref: str) -> str:
    """A Hub id as is; a local path by its last part only, so the card does not publish the machine's layout."""
    return ref if hub_id(ref) else Path(ref.rstrip("/")).name or ref


def model_card(cfg, lang, state: dict[str, Any], evals: list[dict[str, Any]]) -> str:
    import torch
    import transformers

    base = state.get("base_metrics") or next((r for r in evals if r.get("step") == 0), {})
    final = exported_metrics(cfg, state, evals)
    base_id = base_model_id(cfg.whisper_pretrained)
    sets = eval_set_specs(cfg)
    first = next(iter(sets.values()))  # the first evaluation set: its plain eval_* keys picked the model
    dataset = hub_id(first["dataset_name"])
    data_name = _shown(first["dataset_name"])
    exported_step = final.get("step", state.get("step"))

    # Written without spaces, a language's WER counts a whole sentence as one word: the Hub gets its CER only.
    kinds = (("wer", "wer", "WER"), ("cer", "cer", "CER"), ("wer_ortho", "wer", "Orthographic WER")) \
        if lang.uses_spaces else (("cer", "cer", "CER"),)

    def result(metrics: dict[str, Any], prefix: str, spec: dict[str, str]) -> list[dict[str, Any]]:
        values = [{"type": kind, "value": round(metrics[prefix + key], 2), "name": name} for key, kind, name in kinds
                  if metrics.get(prefix + key) is not None]
        if not values:
            return []
        name = _shown(spec["dataset_name"])
        return [{"task": {"type": "automatic-speech-recognition", "name": "Automatic Speech Recognition"},
                 "dataset": {"name": name, "type": hub_id(spec["dataset_name"]) or name,
                             **({"config": spec["dataset_config"]} if spec["dataset_config"] else {}),
                             "split": spec["split"], "args": {"language": lang.code}},
                 "metrics": values}]

    def results(metrics: dict[str, Any]) -> list[dict[str, Any]]:
        if not cfg.eval_sets:
            return result(metrics, "eval_", first)
        return [r for name, spec in sets.items() for r in result(metrics, f"eval/{name}/", spec)]

    # The first entry is this model (what the Hub shows and ranks); the base model's zero-shot numbers
    # on the same data follow as a second, separately named entry so the two are never mixed up.
    index = [{"name": cfg.checkpoint_name, "results": results(final)}]
    if results(base):
        index.append({"name": f"{_shown(cfg.whisper_pretrained)} (base model, before fine-tuning)",
                      "results": results(base)})
    meta = {"language": [lang.code], "license": "apache-2.0",
            # Hub metadata wants a Hub id; a local starting folder is named in the text, never by its path.
            **({"base_model": base_id} if base_id else {}),
            "library_name": "transformers", "pipeline_tag": "automatic-speech-recognition",
            "tags": ["whisper", "whisper-ft", "automatic-speech-recognition"],
            **({"datasets": list(dict.fromkeys(d for d in (hub_id(cfg.dataset_name), dataset) if d))}
               if hub_id(cfg.dataset_name) or dataset else {}),
            "metrics": list(dict.fromkeys(kind for _, kind, _ in kinds)), "model-index": index}
    bad = (state.get("bad") or {}).get("counts") or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    names = {"wer": "WER, normalised (%)", "cer": "CER, normalised (%)", "wer_ortho": "WER, orthographic (%)",
             "loss": "eval loss (per token)"}
    order = ("wer", "cer", "wer_ortho", "loss") if lang.uses_spaces else ("cer", "loss", "wer", "wer_ortho")
    rows = "\n".join(f"| {names[k]} | {fmt(base.get('eval_' + k))} | {fmt(final.get('eval_' + k))} |" for k in order)
    spaces = "" if lang.uses_spaces else (f"\n{lang.name.title()} is written without spaces between words, so CER is "
                                          "the measure; WER counts a whole sentence as one word.\n")
    model_id = cfg.hub_model_id or cfg.checkpoint_name
    data = f"`{data_name}`" + (f" (config `{first['dataset_config']}`)" if first["dataset_config"] else "")
    train_data = f"`{_shown(cfg.dataset_name)}`" + (f" (config `{cfg.dataset_config}`)" if cfg.dataset_config else "")
    samples = final.get("eval_samples", base.get("eval_samples", "n/a"))
    skipped = f"{sum(bad.values())} unusable samples skipped" + (
        ": " + ", ".join(f"{n} {r}" for r, n in bad.items()) if bad else "")
    hours = _hours(state.get("audio_seconds_seen"))
    precision = "fp16" if cfg.fp16 else "bf16" if cfg.bf16 else "fp32"
    origin = f"`{base_id}`" if base_id else f"a local model (`{_shown(cfg.whisper_pretrained)}`)"
    evaluated_on = (", ".join(f"`{n}`" for n in sets) + " (the first chose the model)") if cfg.eval_sets \
        else f"`{cfg.eval_split}`"
    all_sets = sets_table(sets, base, final, order[0]) if cfg.eval_sets else ""
    merged = merge_section(final)
    if "merge_alpha" in final:
        exported_step = f"{exported_step}, merged with the base at alpha {final['merge_alpha']:g}"
    worse = worse_than_base(cfg, base, final)
    warning = f"\n**Warning:** {worse}\n" if worse else ""
    return f"""---
{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()}
---

# {cfg.checkpoint_name}

Fine-tuned from {origin} to {cfg.task} {lang.name.title()} speech with whisper-ft.
{warning}
## Results

| metric | base model (step 0) | this model (step {exported_step}) |
|---|---|---|
{rows}

Both evaluated by generation on {data} split `{first['split']}` ({samples} samples). Normalised: lowercase,
without punctuation and symbols, combining marks kept; orthographic: the raw text.
{spaces}{all_sets}{merged}
## Training

- data: {train_data}; trained on split `{cfg.train_split}`, evaluated on {evaluated_on}
- {state.get('step')} optimizer steps, {state.get('samples_seen')} samples, {hours} of audio
- {skipped}
- learning rate {cfg.learning_rate} ({cfg.lr_scheduler_type}, {cfg.warmup_steps} warmup steps)
- batch {cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} accumulation steps
- weight decay {cfg.weight_decay}, gradient clipping {cfg.max_grad_norm}, seed {cfg.seed}
- precision {precision}, gradient checkpointing {cfg.gradient_checkpointing}
- exported: {'the best' if cfg.load_best_model_at_end else 'the last'} model by {cfg.metric_for_best_model}

Framework versions: {versions(transformers.__version__, torch.__version__)}

## Use

```python
import soundfile as sf  # pip install soundfile soxr: they read WAV, FLAC, OGG and MP3 without FFmpeg
import soxr
from transformers import pipeline

asr = pipeline("automatic-speech-recognition", model="{model_id}")
audio, rate = sf.read("audio.mp3", dtype="float32")
audio = soxr.resample(audio.mean(axis=1) if audio.ndim > 1 else audio, rate, 16000)  # mono, 16 kHz
print(asr(audio, return_timestamps=True)["text"])  # timestamps let it read audio over 30 s
```

(Passing a file name instead, `asr("audio.mp3")`, makes the pipeline decode it with FFmpeg, which must be installed.)

With whisper-ft: `python -m whisper_ft.cli.transcribe --model {model_id} recording.mp3 --format srt`
(long files whole, with segment times); for faster-whisper:
`python -m whisper_ft.cli.export --model {model_id} --quantization int8_float16`.
"""


def sets_table(sets: dict[str, dict[str, str]], base: dict[str, Any], final: dict[str, Any], metric: str) -> str:
    """Every named evaluation set, base and fine-tuned: what fine-tuning gained, and what it cost elsewhere."""
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [f"| {name} | `{_shown(spec['dataset_name'])}` `{spec['split']}` | {final.get(f'eval/{name}/samples', 'n/a')} | "
            f"{fmt(base.get(f'eval/{name}/{metric}'))} | {fmt(final.get(f'eval/{name}/{metric}'))} | "
            f"{fmt(base.get(f'eval/{name}/loss'))} | {fmt(final.get(f'eval/{name}/loss'))} |"
            for name, spec in sets.items()]
    m = metric.upper()
    return ("\nAll evaluation sets (the first chose the exported model; a set outside the training domain shows what "
            f"fine-tuning cost there):\n\n| set | data, split | samples | {m} base | {m} this model | loss base | "
            "loss this model |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _hours(seconds) -> str:
    seconds = float(seconds or 0.0)
    return f"{seconds / 3600:.2f} hours" if seconds >= 360 else f"{seconds / 60:.1f} minutes"


def versions(transformers_version: str, torch_version: str) -> str:
    parts = [f"transformers {transformers_version}", f"torch {torch_version}"]
    for name in ("accelerate", "datasets", "huggingface_hub", "tokenizers"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except Exception:  # an optional package missing must not stop the card
            continue
    return ", ".join(parts) + f", Python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------
# Upload


def upload_list(folder: Path, logs: bool = False) -> list[Path]:
    """The allow-listed files at the top of the model folder (and TensorBoard logs if asked), nothing else."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and any(fnmatch.fnmatch(p.name, a) for a in ALLOW)]
    if logs and (folder / LOGS).is_dir():
        files += sorted(p for p in (folder / LOGS).rglob("*") if p.is_file())
    return files


def card_for_upload(text: str, old_id: str, repo_id: str) -> str:
    """The model card as published: a local base model folder is no valid Hub base_model, and the usage
    example names the repo the model now lives in."""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        head, body = text[4:].split("\n---\n", 1)
        meta = yaml.safe_load(head) or {}
        if meta.get("base_model") and not hub_id(str(meta["base_model"])):
            del meta["base_model"]
        text = f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()}\n---\n{body}"
    return text.replace(f'model="{old_id}"', f'model="{repo_id}"').replace(f"--model {old_id} ", f"--model {repo_id} ")


def push(folder: Path, cfg, attempts: int = 3, logs: bool = False) -> str:
    """Create the repo and upload the allow-listed files in one commit; returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = upload_list(folder, logs)
    names = {p.name for p in files}
    if "config.json" not in names or not names & {"model.safetensors", "model.safetensors.index.json"}:
        raise HubError(f"{folder} holds no exported model (config.json and model.safetensors); "
                       "only a finished run's model folder is uploaded, never a checkpoint-<step> folder")
    token = cfg.hf_token or None
    api = HfApi(token=token)

    def attempt(what: str, call):
        for i in range(1, attempts + 1):
            try:
                return call()
            except Exception as e:  # huggingface_hub raises HTTP, network and OS errors; sort them below
                if i == attempts or not _transient(e):
                    raise HubError(f"could not {what} on {api.endpoint}: {_explain(e, token)}") from None
                time.sleep(RETRY_WAIT_S * 2 ** (i - 1))

    repo_id = cfg.hub_model_id or f"{attempt('look up your user name', api.whoami)['name']}/{cfg.checkpoint_name}"
    url = attempt(f"create the repo {repo_id}", lambda: api.create_repo(repo_id, private=cfg.hub_private,
                                                                        exist_ok=True))
    old_id = cfg.hub_model_id or cfg.checkpoint_name
    operations = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        content = card_for_upload(path.read_text(encoding="utf-8"), old_id, repo_id).encode("utf-8") \
            if rel == "README.md" else str(path)
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    attempt(f"upload {len(operations)} files to {repo_id}", lambda: api.create_commit(
        repo_id=repo_id, operations=operations, commit_message=f"whisper-ft: {cfg.checkpoint_name}"))
    return str(url) if str(url).startswith("http") else f"{api.endpoint}/{repo_id}"


def _transient(e: Exception) -> bool:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    # huggingface_hub's HTTP client (httpx / httpx2) has its own TransportError family for network failures.
    return any(c.__name__ in ("TransportError", "TimeoutException", "NetworkError") for c in type(e).__mro__)


def _explain(e: Exception, token: str | None) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    text = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if token:
        text = text.replace(token, "***")
    if status == 401:
        return f"{text} (the Hub did not accept the token: set HF_TOKEN or run `hf auth login`)"
    if status == 403:
        return f"{text} (the token may only read: it needs write access to create and upload to repos)"
    return text


# ---------------------------------------------------------------------------------------------
# The token, checked before training (an upload that fails after a night of training loses the morning)


def check_token(cfg, offline: bool, whoami=None) -> str | None:
    """Verify the token can upload before any long work; returns a note to log, or raises HubError.

    Offline (HF_HUB_OFFLINE) nothing can be verified: the note says so. Online, whoami tells who the
    token belongs to and what it may do; a token that is refused, or that can only read, stops the run.
    A network failure is only a note: the upload at the end retries, and the Hub may be back by then.
    """
    if not cfg.push_to_hub:
        return None
    if offline:
        return ("warning: HF_HUB_OFFLINE is set, so the Hub token could not be verified; the upload at the end "
                "will fail if it cannot write")
    token = cfg.hf_token or None
    if whoami is None:
        from huggingface_hub import HfApi
        whoami = HfApi(token=token).whoami
    try:
        info = whoami()
    except Exception as e:  # HTTP error with a status, or a network failure
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(f"push_to_hub: {_explain(e, token)}") from None
        return f"warning: could not verify the Hub token now ({_explain(e, token)}); training anyway"
    namespace = cfg.hub_model_id.split("/")[0] if "/" in cfg.hub_model_id else info.get("name", "")
    ok, why = can_write(info, namespace)
    if not ok:
        raise HubError(f"push_to_hub: the Hub token of {info.get('name', '?')} cannot upload to {namespace}: {why}. "
                       "Create a token with write access at https://huggingface.co/settings/tokens")
    return f"Hub token of {info.get('name', '?')} verified: it can write to {namespace}"


def can_write(info: dict[str, Any], namespace: str) -> tuple[bool, str]:
    """Whether a whoami() answer allows creating and uploading to repos of `namespace`, and why not.

    Classic tokens have a role (read / write); fine-grained ones list permissions per user or organisation.
    An answer without token details (an OAuth login, a future format) is not refused: the upload will tell.
    """
    access = (info.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role in ("write", "admin"):
        return True, ""
    if role == "read":
        return False, "it is a read-only token"
    if role == "fineGrained":
        grants = (access.get("fineGrained") or {}).get("scoped") or []
        for grant in grants:
            entity = grant.get("entity") or {}
            if entity.get("name") == namespace and "repo.write" in (grant.get("permissions") or []):
                return True, ""
        if "repo.write" in ((access.get("fineGrained") or {}).get("global") or []):
            return True, ""
        return False, f"this fine-grained token has no repo.write permission for {namespace}"
    return True, ""


def publish(cfg, lang, state, out: Path, say) -> str | None:
    """Model card, Hub upload and the closing summary of a finished run: the before/after numbers a user came for.

    state is the run's RunState. Returns the warning when the exported model is worse than the base model, else None.
    """
    saved = state.to_dict()
    try:
        write_model_card(out, cfg, lang, saved)
    except OSError as e:  # the model itself is whole (written before); a full disk must not turn that into a failure
        from whisper_ft.outputs import free_space
        say(f"warning: could not write the model card {Path(out) / 'README.md'}: {e.strerror or e}; {free_space(out)}")
    base, exported = state.base_metrics or {}, exported_metrics(cfg, saved, read_evals(Path(out)))
    key = "eval_" + cfg.metric_for_best_model
    if base.get(key) is not None and exported.get(key) is not None:  # the model written, merged or not
        merged = f" (merged with the base at alpha {exported['merge_alpha']:g})" if "merge_alpha" in exported else ""
        say(f"{cfg.metric_for_best_model}: base model {base[key]:.2f} -> fine-tuned {exported[key]:.2f}{merged}")
    worse = worse_than_base(cfg, base, exported)
    if state.bad.total:
        say(f"skipped {state.bad.total} unusable samples during training: {state.bad.describe(5)}")
    say(f"final model: {out} (load with WhisperForConditionalGeneration.from_pretrained)")
    if cfg.push_to_hub:
        url = push(out, cfg)
        say(f"uploaded to {url}")
    if worse:  # last, where a user reading the end of train.log sees it
        say("WARNING: " + worse)
    return worse
