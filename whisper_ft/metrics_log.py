"""metrics.jsonl (one JSON object per log line, for scripts and tests) and the trackers of report_to, main process only.

The trackers (TensorBoard, W&B, MLflow, ...) go through accelerate's tracker API: the Accelerator is
built with log_with=<report_to>, and start_trackers() below opens them, so any tracker accelerate
supports works when its package is installed (config.py checks that before the run starts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def start_trackers(accelerator, config: dict[str, Any], resume_step: int | None) -> None:
    """Open report_to's trackers under <checkpoint_dir>/runs; a resumed run overwrites TensorBoard's later steps."""
    if accelerator.log_with:
        # Trackers take scalars and strings as hyperparameters (TensorBoard's add_hparams raises on a
        # dict): a structured setting such as eval_sets goes in as its JSON text.
        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, ensure_ascii=False)
                  for k, v in config.items()}
        accelerator.init_trackers("runs", config=config,
                                  init_kwargs={"tensorboard": {"purge_step": resume_step}} if resume_step else {})


class MetricsLog:
    def __init__(self, folder: Path, accelerator, resume_step: int | None):
        self.path = folder / "metrics.jsonl"
        self.enabled = accelerator.is_main_process
        self.accelerator = accelerator
        self.writer = None  # TensorBoard's SummaryWriter, for the sample predictions (text)
        if not self.enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Lines written after the checkpoint we resume from will be written again: drop them, so the
            # file reads as one uninterrupted run.
            kept = [row for row in read_rows(self.path) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if any(getattr(t, "name", "") == "tensorboard" for t in accelerator.trackers):
            self.writer = accelerator.get_tracker("tensorboard", unwrap=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = (json.dumps({"step": step, **{k: _plain(v) for k, v in values.items()}}, ensure_ascii=False)
                + "\n").encode()
        with open(self.path, "ab", buffering=0) as f:  # unbuffered: a failed write fails here, not at close
            size = f.tell()
            try:
                while line:
                    line = line[f.write(line):]
            except OSError as e:  # a full disk: no half line left behind, and a message instead of a traceback
                f.truncate(size)
                from whisper_ft.checkpoint import CheckpointError
                from whisper_ft.outputs import free_space

                raise CheckpointError(f"cannot write {self.path}: {e.strerror or e}; {free_space(self.path.parent)}. "
                                      "The checkpoints are intact: free some space and rerun the same command to "
                                      "resume") from None
        scalars = {tag(key): value for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
        if scalars and self.accelerator.trackers:
            self.accelerator.log(scalars, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()


def tag(key: str) -> str:
    """TensorBoard tag: eval_wer -> eval/wer, eval/<set>/wer as is, loss -> train/loss."""
    if key.startswith("eval/"):
        return key
    return key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a blank or cut line (the machine died as it was written) is passed over."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the file parseable by every reader
    return value


def set_metrics(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """eval_wer, eval_loss ... of one named evaluation set as eval/<name>/wer, eval/<name>/loss ..."""
    return {f"eval/{name}/{key[5:]}": value for key, value in metrics.items() if key.startswith("eval_")}


def eval_summary(metrics: dict[str, Any], sets: list[str] | None) -> str:
    """One log line: 'wer 12.00, cer 4.00, ...', or per named set 'dev: wer 12.00, ...; general: ...'."""
    shown = ("wer", "cer", "wer_ortho", "loss")
    if not sets:
        return ", ".join(f"{k} {metrics['eval_' + k]:.2f}" for k in shown if "eval_" + k in metrics)
    return "; ".join(f"{name}: " + (", ".join(f"{k} {metrics[f'eval/{name}/{k}']:.2f}" for k in shown
                                              if f"eval/{name}/{k}" in metrics) or "no usable sample")
                     for name in sets)


def samples_table(rows: list[dict[str, str]]) -> str:
    """Sample predictions as a Markdown table (TensorBoard's text tab)."""
    return "\n".join(f"| {r['id']} | {r['reference']} | {r['prediction']} |" for r in
                     [{"id": "id", "reference": "reference", "prediction": "prediction"},
                      {"id": "-", "reference": "-", "prediction": "-"}] + rows)
