"""Nothing a user types destroys data: output folders that are not a run are refused, untrusted checkpoints are
kept, file-system errors are messages, nonsense settings are refused or named. Each subprocess case drives
train_loop.py or a CLI and checks the exit code, the message and that every file there before is byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_config, run_train
from whisper_ft.checkpoint import CheckpointError

HERE = Path(__file__).resolve().parent


def checksums(*folders: Path) -> dict[str, str]:
    """Every file under the folders, by path: its sha256."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unchanged(before: dict[str, str]) -> None:
    after = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in before if Path(p).is_file()}
    assert after == before, sorted(set(before) - set(after)) or [p for p in before if before[p] != after.get(p)]


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    """A copy of the tiny model that a test may point checkpoint_dir at without touching the shared one."""
    return Path(shutil.copytree(tiny_model, tmp_path / "base-model"))


# ---- the output folder: in-process, then through train_loop.py ----

def test_only_empty_folders_and_runs_are_accepted(tmp_path, tiny_model):
    from whisper_ft.outputs import MARKER, check_output_dir

    check_output_dir(tmp_path / "new", inputs={})  # not there yet
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", inputs={})
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / MARKER).write_text("x")
    (marked / "notes.txt").write_text("x")
    check_output_dir(marked, inputs={})
    old = tmp_path / "old-run"  # a run of the layout before the marker: its checkpoint is recognised
    (old / "checkpoint-3").mkdir(parents=True)
    (old / "checkpoint-3" / "trainer_state.json").write_text("{}")
    check_output_dir(old, inputs={})
    with pytest.raises(CheckpointError, match="not empty and is not a whisper-ft run.*model.safetensors"):
        check_output_dir(tiny_model, inputs={})
    with pytest.raises(CheckpointError, match="holds the config file"):
        check_output_dir(tmp_path, inputs={"the config file": marked / "notes.txt"})
    with pytest.raises(CheckpointError, match="whisper-ft repository"):
        check_output_dir(ROOT, inputs={}, repository=ROOT)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        check_output_dir(tmp_path / "file" / "run", inputs={})


@pytest.mark.slow
@pytest.mark.parametrize("where", ["model", "config folder", "repository", "parent of a file"])
def test_a_folder_that_is_not_a_run_is_refused_before_anything_is_written(where, model_copy, tmp_path):
    conf_dir = tmp_path / "my-configs"
    conf_dir.mkdir()
    (conf_dir / "notes.md").write_text("my notes\n")
    out = {"model": model_copy, "config folder": conf_dir, "repository": ROOT,
           "parent of a file": conf_dir / "notes.md" / "run"}[where]
    cfg = base_config(model_copy, out)
    config = conf_dir / "train.yaml"
    config.write_text("# my commented config\n" + yaml.safe_dump(cfg), encoding="utf-8")
    watched = [model_copy, conf_dir] + ([] if where != "repository" else [ROOT / "whisper_ft"])
    before = checksums(*watched)
    proc = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = {"model": "holds the base model", "config folder": "holds the config file",
                "repository": "is the whisper-ft repository itself", "parent of a file": "is a file, not a folder"}
    assert expected[where] in proc.stderr
    no_traceback(proc)
    unchanged(before)
    assert not (model_copy / ".whisper-ft-run").exists() and not (ROOT / ".whisper-ft-run").exists()


@pytest.mark.slow
def test_a_run_of_the_layout_before_the_marker_still_resumes(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=6, save_steps=3, eval_strategy="no", load_best_model_at_end=False)
    first = run_train(cfg, tmp_path, "--stop-at-step", "3")
    assert first.returncode == 0, first.stderr[-2000:]
    (out / ".whisper-ft-run").unlink()  # what a run started by the released version looks like
    kept = checksums(out / "checkpoint-3")
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "checkpoint-3" in proc.stderr
    assert (out / "checkpoint-6").is_dir()
    unchanged(kept)


# ---- checkpoints that cannot be trusted ----

@pytest.mark.parametrize("saved, why", [({}, "no 'step'"), ([1, 2], "JSON list"), ({"step": "3"}, "step is '3'"),
                                        ({"step": 5}, "says step 5"), ({"step": 3, "config": []}, "config is []")])
def test_a_state_that_is_not_complete_and_consistent_is_skipped(saved, why, tmp_path):
    from whisper_ft.checkpoint import COMPLETE, STATE_FILE, find_resumable

    for step, state in ((2, {"step": 2}), (3, saved)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / STATE_FILE).write_text(json.dumps(state))
        (folder / COMPLETE).write_text(str(step))
    said = []
    assert find_resumable(tmp_path, said.append) == tmp_path / "checkpoint-2"
    assert len(said) == 1 and "checkpoint-3" in said[0] and why in said[0], said


@pytest.mark.slow
@pytest.mark.parametrize("bad", [{}, [1, 2]])
def test_a_newest_checkpoint_with_a_broken_state_is_skipped_and_kept(bad, tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=6, save_steps=3, eval_strategy="no", load_best_model_at_end=False,
                      save_total_limit=1)
    assert run_train(cfg, tmp_path, "--stop-at-step", "3").returncode == 0
    shutil.copytree(out / "checkpoint-3", out / "checkpoint-6")
    (out / "checkpoint-6" / "COMPLETE").write_text("6")
    (out / "checkpoint-6" / "trainer_state.json").write_text(json.dumps(bad))
    before = checksums(out / "checkpoint-3", out / "checkpoint-6")
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    no_traceback(proc)
    assert "skipping checkpoint-6" in proc.stderr and "cannot be trusted" in proc.stderr
    assert "never pruned or saved over: checkpoint-6" in proc.stderr
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    # the run's own step-6 save moved the untrusted folder aside, byte for byte, and save_total_limit 1 pruned
    # neither it nor the checkpoint resumed from
    aside = out / "checkpoint-6.skipped"
    moved = {p.replace(str(out / "checkpoint-6"), str(aside), 1) if p.startswith(str(out / "checkpoint-6") + "/")
             else p: h for p, h in before.items()}
    unchanged(moved)
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6


@pytest.mark.slow
def test_only_untrusted_checkpoints_stop_the_run_and_change_nothing(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=6, save_steps=3, eval_strategy="no", load_best_model_at_end=False)
    assert run_train(cfg, tmp_path, "--stop-at-step", "3").returncode == 0
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    before = checksums(out)
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 1
    assert "none is complete and readable; refusing to start over" in proc.stderr
    no_traceback(proc)
    unchanged(before)


# ---- file-system errors ----

def test_a_full_disk_at_torch_save_removes_the_partial_save_and_keeps_the_older(tmp_path, monkeypatch):
    """The fault is injected at torch.save (what accelerate's save_state writes optimizer.bin with): half the file
    is written, then PyTorch's own RuntimeError for a failed write, as on ENOSPC."""
    import torch
    from accelerate import Accelerator

    from whisper_ft import checkpoint

    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(4, 4))
    older = checkpoint.save(acc, tmp_path, 1, {"step": 1})
    before = checksums(older)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:10])
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"saving .*checkpoint-2 failed \(RuntimeError.*free under"):
        checkpoint.save(acc, tmp_path, 2, {"step": 2})
    assert not (tmp_path / "checkpoint-2.tmp").exists() and not (tmp_path / "checkpoint-2").exists()
    unchanged(before)
    del model


def test_the_disk_check_refuses_what_cannot_hold_one_checkpoint_and_the_model(tmp_path):
    from whisper_ft.checkpoint import check_disk, checkpoint_bytes

    n = 1_000_000
    assert checkpoint_bytes(n) == n * 12  # fp32 weights and AdamW's two moments
    assert checkpoint_bytes(n, trained=1000) == 1000 * 12  # LoRA: only the trained weights are saved
    said = []
    with pytest.raises(CheckpointError, match=r"1\.0 MB free .* need 16\.0 MB"):
        check_disk(tmp_path, n, 2, said.append, free=1_000_000)
    check_disk(tmp_path, n, 2, said.append, free=17_000_000)  # one fits, three do not: a warning only
    assert len(said) == 1 and "warning" in said[0] and "40.0 MB" in said[0]


@pytest.mark.slow
def test_a_read_only_checkpoint_dir_is_a_message(tiny_model, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through permissions; the read-only case is checked by writable_problem's test")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        proc = run_train(base_config(tiny_model, locked / "run"), tmp_path)
    finally:
        locked.chmod(0o700)
    assert proc.returncode == 2 and "not writable" in proc.stderr
    no_traceback(proc)


def test_writable_problem_names_a_read_only_or_unwritable_folder(tmp_path, monkeypatch):
    from whisper_ft import outputs

    monkeypatch.setattr(outputs.os, "access", lambda *a: False)
    assert "not writable" in outputs.writable_problem(tmp_path / "run") or "read-only" in outputs.writable_problem(
        tmp_path / "run")


def train_on_a_full_disk(cfg: dict, tmp_path: Path, fault: str) -> subprocess.CompletedProcess:
    """train_loop.main in a process where `fault` (Python source) has first made a writer fail as on a full disk."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    wrapper = (fault + "import sys\n"
               f"sys.argv = ['train_loop.py', '--config', {str(config)!r}]\n"
               f"sys.path.insert(0, {str(ROOT)!r})\n"
               "import train_loop\n"
               "sys.exit(train_loop.main())\n")
    return subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_full_disk_during_training_exits_with_the_path_and_free_space(tiny_model, tmp_path):
    """The fault is injected at torch.save in the training process (a wrapper runs train_loop.main)."""
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=6, save_steps=3, eval_strategy="no", load_best_model_at_end=False)
    assert run_train(cfg, tmp_path, "--stop-at-step", "3").returncode == 0
    before = checksums(out / "checkpoint-3")
    proc = train_on_a_full_disk(cfg, tmp_path, (
        "import torch\n"
        "def full(obj, f, *a, **k):\n"
        "    open(f, 'wb').write(b'PK partial')\n"
        "    raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')\n"
        "torch.save = full\n"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "checkpoint-6 failed (RuntimeError" in proc.stderr and "free under" in proc.stderr
    no_traceback(proc)
    assert not (out / "checkpoint-6.tmp").exists() and not (out / "checkpoint-6").exists()
    unchanged(before)


class FillingFile:
    """A file on a disk that fills up: the first write gets half its bytes in, the next one ENOSPC."""

    def __init__(self, path, mode="r", **kwargs):
        import io
        self.f, self.writes = io.FileIO(path, mode.replace("b", "")), 0

    def write(self, data):
        self.writes += 1
        if self.writes > 1:
            raise OSError(28, "No space left on device")
        return self.f.write(bytes(data)[: len(data) // 2])

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_at_a_metrics_line_is_a_message_and_leaves_no_half_line(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from whisper_ft import metrics_log

    acc = SimpleNamespace(is_main_process=True, trackers=[])
    log = metrics_log.MetricsLog(tmp_path, acc, None)
    log.log(1, {"loss": 2.5})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(metrics_log, "open", FillingFile, raising=False)
    with pytest.raises(CheckpointError, match=r"cannot write .*metrics\.jsonl: No space left on device; .* free under"):
        log.log(2, {"loss": 2.4})
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_a_cut_metrics_line_is_passed_over_by_the_resume_and_the_model_card(tmp_path):
    """The machine died as a line was written: the resume keeps the whole rows up to its step, the card reads on."""
    from types import SimpleNamespace

    from whisper_ft import hub, metrics_log

    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "eval_loss": 2.0, "eval_wer": 50.0}, {"step": 3, "loss": 2.1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert hub.read_evals(tmp_path) == [rows[1]]
    metrics_log.MetricsLog(tmp_path, SimpleNamespace(is_main_process=True, trackers=[]), 2)
    assert metrics_log.read_rows(tmp_path / "metrics.jsonl") == rows[:2]


@pytest.mark.slow
def test_a_failed_export_leaves_no_final_model_and_the_rerun_exports(tiny_model, tmp_path):
    """A run finished and exported at step 2, trained on to step 4, its export cut by a full disk (injected at
    transformers' safetensors write): no config.json is left to call the run finished, neither the new model nor the
    step-2 one; the rerun of the same command exports the step-4 weights."""
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=2, save_steps=2, eval_strategy="no", load_best_model_at_end=False)
    assert run_train(cfg, tmp_path).returncode == 0 and (out / "config.json").is_file()
    cfg["max_steps"] = 4
    proc = train_on_a_full_disk(cfg, tmp_path, (
        "import transformers.modeling_utils as m\n"
        "def full(tensors, filename, metadata=None):\n"
        "    open(filename, 'wb').write(b'partial')\n"
        "    raise OSError(28, 'No space left on device')\n"
        "m.safe_save_file = full\n"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "writing the final model" in proc.stderr and "No space left on device" in proc.stderr
    no_traceback(proc)
    assert not (out / "config.json").exists() and not list(out.glob("model*.safetensors"))
    assert not (out / ".export.tmp").exists()
    saved = checksums(out / "checkpoint-4")

    again = run_train(cfg, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "this run is finished" not in again.stderr
    unchanged(saved)
    import torch
    from safetensors.torch import load_file
    from transformers import WhisperForConditionalGeneration

    final = WhisperForConditionalGeneration.from_pretrained(out).state_dict()
    trained = load_file(out / "checkpoint-4" / "model.safetensors")
    assert trained and all(torch.equal(final[k], v) for k, v in trained.items())


# ---- nonsense settings ----

def test_learning_rate_zero_and_duplicate_keys_are_refused(tmp_path, tiny_model):
    from whisper_ft.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config(tiny_model, tmp_path / "run", learning_rate=0)))
    with pytest.raises(ConfigError, match="learning_rate is 0"):
        load_config(["--config", str(path)], training=True)
    path.write_text("lang: en\nmax_steps: 5\nwarmup_steps: 1\nmax_steps: 50\n")
    with pytest.raises(ConfigError, match=r"max_steps is set twice.*lines 2 and 4"):
        load_config(["--config", str(path)])


@pytest.mark.slow
def test_stop_at_step_already_reached_stops_again_at_once(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=6, save_steps=3, eval_strategy="no", load_best_model_at_end=False,
                      stop_at_step=3)
    assert run_train(cfg, tmp_path).returncode == 0
    before = checksums(out)
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stop_at_step 3 was already reached" in proc.stderr
    assert not (out / "checkpoint-6").exists()
    unchanged(before)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["learning_rate 0", "duplicate key"])
def test_nonsense_settings_are_refused_by_the_command(case, tiny_model, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    text = yaml.safe_dump(base_config(tiny_model, out, **({"learning_rate": 0} if case == "learning_rate 0" else {})))
    if case == "duplicate key":
        text += "max_steps: 600\n"
    config.write_text(text)
    before = checksums(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("max_steps"))
    assert ("learning_rate is 0" if case == "learning_rate 0" else
            f"max_steps is set twice (lines {line} and {len(text.splitlines())})") in proc.stderr
    no_traceback(proc)
    unchanged(before)
    assert not out.exists()


def manifest_with_unusable_eval(tmp_path: Path, train_rows: int = 25) -> Path:
    """A CSV manifest: `train_rows` good training clips (repeated), and an eval split of audio that does not decode."""
    from conftest import BAD

    rows = ["path,text,split"]
    good = sorted((BAD / "good").glob("*.mp3"))
    rows += [f"{good[i % len(good)]},the cat sat down,train" for i in range(train_rows)]
    rows += [f"{BAD / name},the cat sat down,dev" for name in ("corrupt.mp3", "truncated.mp3")]
    path = tmp_path / "data" / "manifest.csv"
    path.parent.mkdir()
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_an_evaluation_set_with_no_usable_sample_writes_no_metrics_and_stops(tiny_model, tmp_path):
    data = manifest_with_unusable_eval(tmp_path)
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, dataset_name=str(data), max_steps=4, eval_steps=2, save_steps=4)
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    no_traceback(proc)
    assert "evaluation set eval is unusable" in proc.stderr and "picks the best model" in proc.stderr
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    assert not any("eval_loss" in r for r in logged)
    assert (out / "checkpoint-2").is_dir()  # the training done so far is saved


@pytest.mark.slow
def test_a_training_set_of_one_sample_is_named(tiny_model, tmp_path):
    data = manifest_with_unusable_eval(tmp_path, train_rows=1)
    cfg = base_config(tiny_model, tmp_path / "run", dataset_name=str(data), max_steps=2, eval_strategy="no",
                      load_best_model_at_end=False, save_steps=2)
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: only 1 training samples" in proc.stderr and "batch of 4" in proc.stderr


# ---- messages that blame the right thing ----

@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing model folder", "model not cached offline", "missing dataset folder",
                                  "comma-separated .tsv"])
def test_a_wrong_input_is_named_for_what_it_is(case, tiny_model, tmp_path):
    out = tmp_path / "run"
    if case == "comma-separated .tsv":
        data = tmp_path / "my.tsv"
        good = sorted((ROOT / "tests" / "data" / "bad" / "good").glob("*.mp3"))
        data.write_text("path,text,split\n" + "".join(f"{g},the cat sat down,train\n" for g in good))
    overrides = {"missing model folder": {"whisper_pretrained": str(tmp_path / "models" / "my-whisper")},
                 "model not cached offline": {"whisper_pretrained": "someone/whisper-not-cached"},
                 "missing dataset folder": {"dataset_name": str(tmp_path / "corpora" / "mine")},
                 "comma-separated .tsv": {"dataset_name": str(tmp_path / "my.tsv"), "eval_strategy": "no",
                                          "load_best_model_at_end": False}}[case]
    proc = run_train(base_config(tiny_model, out, **overrides), tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    no_traceback(proc)
    expected = {"missing model folder": "no such folder", "model not cached offline": "not in the model cache and "
                "HF_HUB_OFFLINE=1", "missing dataset folder": "does not exist: no such file or folder",
                "comma-separated .tsv": "is named .tsv but its header is comma-separated"}[case]
    assert expected in proc.stderr
    assert "network" not in proc.stderr


@pytest.fixture(scope="module")
def stopped_run(tiny_model, tmp_path_factory) -> Path:
    """A run stopped at step 3 (checkpoint-3, no final model): what evaluate is pointed at below."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = base_config(tiny_model, tmp / "run", max_steps=6, save_steps=3, eval_strategy="no",
                      load_best_model_at_end=False)
    proc = run_train(cfg, tmp, "--stop-at-step", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["LoRA checkpoint", "state is a list", "truncated weights", "another architecture"])
def test_evaluate_on_a_broken_or_adapter_model_is_a_message(case, stopped_run, tiny_model, tmp_path):
    run = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    model = run / "checkpoint-3"
    state = model / "trainer_state.json"
    if case == "LoRA checkpoint":
        saved = json.loads(state.read_text())
        saved["config"]["lora_r"] = 8
        state.write_text(json.dumps(saved))
    elif case == "state is a list":
        state.write_text("[1, 2]")
    elif case == "truncated weights":
        model = Path(shutil.copytree(tiny_model, tmp_path / "final"))
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        from safetensors.torch import save_file
        import torch

        model = Path(shutil.copytree(tiny_model, tmp_path / "final"))
        save_file({"wav2vec2.encoder.layer.0.weight": torch.zeros(4, 4)}, str(model / "model.safetensors"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_model, run, max_eval_samples=2)))
    before = checksums(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "whisper_ft.cli.evaluate", "--config", str(config), "--model",
                           str(model)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    no_traceback(proc)
    expected = {"LoRA checkpoint": f"is a LoRA checkpoint: it holds only the adapter weights, not a whole model. "
                f"Evaluate the run's final model folder ({run}",
                "state is a list": "is not a run state (it holds a JSON list)",
                "truncated weights": "SafetensorError", "another architecture": "not a Whisper's"}[case]
    assert expected in proc.stderr
    unchanged(before)


@pytest.mark.slow
def test_a_disk_too_small_for_one_checkpoint_is_refused_before_training(tiny_model, tmp_path):
    """shutil.disk_usage is made to report 1 MB free in the training process (a wrapper runs train_loop.main)."""
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_model, out)))
    before = checksums(tmp_path)
    wrapper = (
        "import sys, shutil, collections\n"
        "Usage = collections.namedtuple('Usage', 'total used free')\n"
        "shutil.disk_usage = lambda path: Usage(10**9, 10**9 - 10**6, 10**6)\n"
        f"sys.argv = ['train_loop.py', '--config', {str(config)!r}]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train_loop\n"
        "sys.exit(train_loop.main())\n")
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "1.0 MB free under" in proc.stderr and "plus the final model" in proc.stderr
    no_traceback(proc)
    unchanged(before)
    assert not list(out.glob("checkpoint-*"))


def test_a_delimiter_that_does_not_match_the_extension_and_a_missing_path_are_named(tmp_path):
    from whisper_ft.data import DataError
    from whisper_ft.sources import load_records

    (tmp_path / "m.tsv").write_text("path,text,split\na.wav,hello,train\n")
    (tmp_path / "m.csv").write_text("path\ttext\tsplit\na.wav\thello\ttrain\n")
    with pytest.raises(DataError, match=r"named \.tsv but its header is comma-separated .*rename it to m\.csv"):
        load_records(str(tmp_path / "m.tsv"), "train")
    with pytest.raises(DataError, match=r"named \.csv but its header is tab-separated .*rename it to m\.tsv"):
        load_records(str(tmp_path / "m.csv"), "train")
    with pytest.raises(DataError, match="does not exist: no such file or folder"):
        load_records(str(tmp_path / "corpora" / "mine"), "train")


def test_models_that_cannot_be_whisper_are_named_without_random_weights(tiny_model, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    import torch

    from whisper_ft.languages import resolve
    from whisper_ft.model import ModelError, load_whisper

    en = resolve("en")
    with pytest.raises(ModelError, match="no such folder"):
        load_whisper(str(tmp_path / "models" / "mine"), en, "transcribe")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the model cache and HF_HUB_OFFLINE=1"):
        load_whisper("someone/whisper-not-cached", en, "transcribe")
    other = Path(shutil.copytree(tiny_model, tmp_path / "other"))
    save_file({"wav2vec2.encoder.layer.0.weight": torch.zeros(4, 4)}, str(other / "model.safetensors"))
    with pytest.raises(ModelError, match="not a Whisper's"):
        load_whisper(str(other), en, "transcribe")
    data = (tiny_model / "model.safetensors").read_bytes()
    (other / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="SafetensorError"):
        load_whisper(str(other), en, "transcribe")
