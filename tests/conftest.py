"""Shared fixtures: a tiny Whisper built offline, the committed corpus, and a runner for train_loop.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
CV_EN = DATA / "cv-en"
CV_AS = DATA / "cv-as"
BAD = DATA / "bad"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A multilingual tiny Whisper whose BPE knows the English and Assamese corpus sentences."""
    from whisper_ft import tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    texts = tiny.texts_from_tsv(CV_EN / "validated.tsv") + tiny.texts_from_tsv(CV_AS / "train.tsv")
    return tiny.build(out, texts)


@pytest.fixture(scope="session")
def tiny_model_en(tmp_path_factory) -> Path:
    """An English-only tiny Whisper (no language tokens), like the *.en checkpoints."""
    from whisper_ft import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny_en") / "model", tiny.texts_from_tsv(CV_EN / "validated.tsv"),
                      multilingual=False)


@pytest.fixture(scope="session")
def learned_run(tiny_model, tmp_path_factory):
    """The demo's recipe, run once per session: the tiny Whisper learns to read the committed clips
    (150 steps). Shared by the learning test and the long-form checks, which need a model that reads."""
    tmp = tmp_path_factory.mktemp("learned")
    out = tmp / "learn"
    cfg = base_config(tiny_model, out, per_device_train_batch_size=8, learning_rate=1e-3, warmup_steps=20,
                      max_steps=150, eval_steps=150, save_steps=150, logging_steps=10, eval_at_start=True,
                      predict_with_generate=True, generation_max_length=24, metric_for_best_model="wer",
                      eval_split="train", max_eval_samples=16)
    proc = run_train(cfg, tmp, timeout=1800)  # 150 steps: minutes on 2 cores, more when they are shared
    return out, proc, cfg


def base_config(model: Path, out: Path, **overrides) -> dict:
    """A fast CPU config on the committed English clips."""
    cfg = {"lang": "en", "whisper_pretrained": str(model), "checkpoint_dir": str(out), "dataset_name": str(CV_EN),
           "train_split": "train", "eval_split": "dev", "per_device_train_batch_size": 4,
           "per_device_eval_batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 2, "max_steps": 6,
           "eval_steps": 3, "save_steps": 3, "logging_steps": 1, "gradient_checkpointing": False,
           "fp16": False, "bf16": False,
           "dataloader_num_workers": 0, "report_to": "none", "eval_at_start": False, "predict_with_generate": False,
           "metric_for_best_model": "loss", "merge_base": False}  # merging has its own tests (test_merge.py)
    cfg.update(overrides)
    return cfg


def run_train(cfg: dict, tmp: Path, *args: str, launcher: list[str] | None = None, env: dict | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    path = tmp / f"config-{abs(hash(json.dumps(cfg, sort_keys=True))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train_loop.py"), "--config", str(path), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(processes: int = 2) -> list[str]:
    """The launcher for `processes` processes on this machine, on a port nobody holds (a fixed one can still be
    held by the previous test's launcher)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(out: Path) -> list[tuple]:
    """(step, loss, lr) of every training log line: what an exact resume must reproduce."""
    return [(r["step"], r["loss"], r["lr"]) for r in metrics(out) if "loss" in r]


def straight_and_resumed(model: Path, tmp: Path, cfg: dict, stops: tuple[int, ...]):
    """The same run twice: straight to the end, and stopped at each of `stops` (the last is max_steps) and
    resumed by rerunning the command. Returns (straight folder, resumed folder, the straight run's process,
    the last resumed process)."""
    straight, resumed = tmp / "straight", tmp / "resumed"
    first = run_train(base_config(model, straight, **cfg), tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    for stop_at in stops:
        proc = run_train(base_config(model, resumed, **cfg), tmp, "--stop-at-step", str(stop_at))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    return straight, resumed, first, proc


def assert_queued_without_readbacks(model: Path, tmp: Path, **overrides) -> subprocess.CompletedProcess:
    """8 steps counted by tests/workers/count_readbacks.py, a NaN injected at step 3: train_step reads nothing
    back, settle() at most the loss and norm of two steps (at a log step), the rest only where it logs or saves
    (steps 4 and 8), and the NaN step is still skipped and counted. Returns the run's process."""
    out = tmp / "run"
    cfg = base_config(model, out, max_steps=8, logging_steps=4, save_steps=8, eval_strategy="no",
                      load_best_model_at_end=False, dataloader_num_workers=1, **overrides)  # audio reads: elsewhere
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "count_readbacks.py"), str(path),
                           str(tmp / "counts.json")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WHISPER_FT_INJECT_NAN": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp / "counts.json").read_text())
    assert result["exit"] == 0
    steps = result["steps"]
    assert len(steps) == 8
    assert [s["train_step"] for s in steps] == [0] * 8
    assert all(s["settle"] <= 4 for s in steps)
    assert [s["elsewhere"] for i, s in enumerate(steps, 1) if i not in (4, 8)] == [0] * 6
    assert "step 3: loss is nan; update skipped" in proc.stderr
    assert [r["nonfinite_steps"] for r in metrics(out) if "loss" in r] == [1, 1]
    return proc


@pytest.fixture(scope="session")
def tiny_model_1layer(tmp_path_factory) -> Path:
    """One layer each side, d_model 32: the smallest graph for the torch.compile test (compiling is slow on CPU)."""
    from whisper_ft import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny1") / "model", tiny.texts_from_tsv(CV_EN / "validated.tsv"),
                      d_model=32, layers=1)
