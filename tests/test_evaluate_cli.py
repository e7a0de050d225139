"""python -m whisper_ft.cli.evaluate: the same numbers as the training run's own evaluations, per-sample rows,
any model (base, checkpoint, final), any split, one or two processes, clear errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import BAD, CV_EN, ROOT, base_config, metrics, run_train, torchrun


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A 2-step run that evaluated the base model at step 0 and the final model at step 2 (on dev)."""
    tmp = tmp_path_factory.mktemp("evalrun")
    out = tmp / "run"
    cfg = base_config(tiny_model, out, max_steps=2, save_steps=2, eval_steps=2, eval_at_start=True,
                      predict_with_generate=True, generation_max_length=12, metric_for_best_model="wer")
    proc = run_train(cfg, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config, out


def evaluate(config: Path, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "whisper_ft.cli.evaluate", "--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def evaluate_here(config: Path, *args: str, capsys=None) -> tuple[int, str]:
    """The same command in this process (no interpreter start-up): (exit code, stderr)."""
    from whisper_ft.cli.evaluate import main

    code = main(["--config", str(config), *args])
    return code, capsys.readouterr().err if capsys else ""


def outputs(folder: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return summary, rows


def dev_sentences() -> dict[str, str]:
    with open(CV_EN / "dev.tsv", newline="", encoding="utf-8") as f:
        return {r["path"]: r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}


def same_metrics(a: dict, b: dict) -> None:
    for key in ("eval_wer", "eval_cer", "eval_wer_ortho", "eval_samples"):
        assert a[key] == b[key], key
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_final_model_reproduces_the_runs_last_evaluation(trained):
    """No --model: the run's exported model; its numbers equal the step-2 line of metrics.jsonl."""
    config, out = trained
    proc = evaluate(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, rows = outputs(out / "eval" / "final-dev")
    assert summary["model"] == str(out) and summary["model_kind"] == "fine-tuned" and summary["split"] == "dev"
    last = [r for r in metrics(out) if "eval_wer" in r and r["step"] == 2][-1]
    same_metrics(summary["metrics"], last)
    sentences = dev_sentences()
    assert len(rows) == summary["metrics"]["eval_samples"] == len(sentences) == 8
    assert sorted(r["id"] for r in rows) == sorted(sentences)
    assert all(r["reference"] == sentences[r["id"]].strip() for r in rows)
    assert all(set(r) == {"id", "reference", "prediction", "wer"} and r["wer"] is not None for r in rows)


@pytest.mark.slow
def test_base_model_on_test_split_and_a_checkpoint_folder(trained, tiny_model, tmp_path, capsys):
    """--model BASE --split test is the zero-shot baseline (test.tsv is a copy of dev: equal to step 0);
    --model checkpoint-2 loads raw training state (tied proj_out restored) and equals the final model."""
    config, out = trained
    code, err = evaluate_here(config, "--model", str(tiny_model), "--split", "test", "--output-dir",
                              str(tmp_path / "base"), capsys=capsys)
    assert code == 0, err[-3000:]
    summary, rows = outputs(tmp_path / "base")
    assert summary["model_kind"] == "base" and summary["split"] == "test" and len(rows) == 8
    same_metrics(summary["metrics"], [r for r in metrics(out) if "eval_wer" in r and r["step"] == 0][0])

    code, err = evaluate_here(config, "--model", str(out / "checkpoint-2"), capsys=capsys)
    assert code == 0, err[-3000:]
    summary, rows = outputs(out / "eval" / "checkpoint-2-dev")
    assert summary["model_kind"] == "checkpoint" and len(rows) == 8
    same_metrics(summary["metrics"], [r for r in metrics(out) if "eval_wer" in r and r["step"] == 2][-1])


@pytest.mark.slow
def test_two_processes_count_every_sample_once(trained, tmp_path):
    """torchrun x2 on CPU: 8 samples split 4+4, gathered and written once, the same numbers as one process."""
    config, out = trained
    proc = evaluate(config, "--output-dir", str(tmp_path / "two"),
                    launcher=torchrun())
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, rows = outputs(tmp_path / "two")
    assert summary["processes"] == 2
    assert len(rows) == len({r["id"] for r in rows}) == summary["metrics"]["eval_samples"] == 8
    same_metrics(summary["metrics"], [r for r in metrics(out) if "eval_wer" in r and r["step"] == 2][-1])


def test_a_foreign_output_folder_is_refused_before_anything_is_evaluated_or_written(tiny_model, tmp_path, capsys,
                                                                                  monkeypatch):
    """Two sets, the second's folder holding a summary.json evaluate did not write: refused before the first set
    is evaluated, so no process ever reads a summary.json the main process is still writing."""
    import whisper_ft.evaluation

    def not_now(*args, **kwargs):
        raise AssertionError("evaluated before the output folders were checked")

    monkeypatch.setattr(whisper_ft.evaluation, "evaluate", not_now)
    cfg = base_config(tiny_model, tmp_path / "run", eval_sets={"first": {"split": "dev"}, "second": {"split": "test"}})
    config = tmp_path / "two-sets.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (tmp_path / "ev" / "second").mkdir(parents=True)
    (tmp_path / "ev" / "second" / "summary.json").write_text('{"mine": 1}\n')
    code, err = evaluate_here(config, "--output-dir", str(tmp_path / "ev"), capsys=capsys)
    assert code == 1 and "did not write" in err and str(tmp_path / "ev" / "second") in err
    assert not (tmp_path / "ev" / "first").exists()
    assert (tmp_path / "ev" / "second" / "summary.json").read_text() == '{"mine": 1}\n'


def test_unusable_samples_are_skipped_counted_and_named(tiny_model, tmp_path, capsys):
    """The committed bad/ manifest: 21 rows, the broken ones reported by id and reason, the rest evaluated."""
    cfg = base_config(tiny_model, tmp_path / "run", dataset_name=str(BAD / "manifest.csv"), eval_split="dev",
                      generation_max_length=8)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code, err = evaluate_here(config, capsys=capsys)
    assert code == 0, err[-3000:]
    summary, rows = outputs(tmp_path / "run" / "eval" / "base-dev")
    skipped = {s["id"] for s in summary["skipped"]}
    assert len(rows) + summary["skipped_samples"] == 21 and len(rows) >= 10
    assert {"corrupt.mp3", "missing.mp3", "empty_text.mp3"} <= {Path(i).name for i in skipped}
    assert not skipped & {r["id"] for r in rows}
    assert "unusable samples" in err and "corrupt.mp3" in err


@pytest.mark.slow
def test_bad_config_and_missing_model_are_one_clear_message(trained, tmp_path, capsys):
    config, _ = trained
    code, err = evaluate_here(config, "--split", "test", "--learning-rat", "1", capsys=capsys)
    assert code == 2 and "unknown option --learning-rat" in err
    code, err = evaluate_here(config, "--model", str(tmp_path / "nothing-here"), capsys=capsys)
    assert code == 1 and "could not load Whisper" in err and "no such folder" in err
