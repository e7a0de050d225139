"""Signals, kills during saves, NaN losses, and a token that never leaks."""

import pytest
import json
import os
import random
import signal
import subprocess
import sys
import time

import yaml

from conftest import ROOT, base_config, metrics, run_train, torchrun


def start(cfg: dict, tmp_path, env=None) -> subprocess.Popen:
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, str(ROOT / "train_loop.py"), "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_for_step(out, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        path = out / "metrics.jsonl"
        if path.exists() and any(json.loads(line).get("step", 0) >= step and "loss" in line
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=1000, save_steps=1000, eval_steps=1000)
    proc = start(cfg, tmp_path)
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err[-2000:]
    assert "got SIGTERM" in err and "checkpoint saved" in err and "Traceback" not in err
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert len(saved) == 1 and saved[0] >= 2
    resumed = run_train(cfg, tmp_path, "--stop-at-step", str(saved[0] + 1))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / f'checkpoint-{saved[0]}'}" in resumed.stderr
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, saved[0] + 2))


@pytest.mark.slow
@pytest.mark.parametrize("data", ["records", "streamed"])
def test_a_signal_during_a_step_drops_it_saves_the_last_and_the_resume_is_exact(tiny_model, tmp_path, data):
    """One process stops at once rather than finish the step under way (accelerate 1.16's launcher SIGKILLs 5 s
    after passing a SIGTERM on). The signal lands after the first of two accumulated micro-batches, SpecAugment
    having drawn random numbers: 6 steps straight == stopped in that step + rerun, bit for bit. The streamed run
    drops the step that crosses its epoch boundary (25 rows, 6 per step), so its saved position is the step's start."""
    from safetensors.torch import load_file

    from conftest import train_rows
    from test_train_e2e import parquet_copy

    cfg = dict(max_steps=6, save_steps=100, eval_steps=100, gradient_accumulation_steps=2, apply_spec_augment=True,
               mask_time_prob=0.2, mask_feature_prob=0.2)
    if data == "records":
        cfg.update(dataloader_num_workers=1, per_device_train_batch_size=3)
    else:
        cfg.update(dataset_name=str(parquet_copy(tmp_path / "pq")), streaming=True, eval_split="validation",
                   per_device_train_batch_size=3)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_train(base_config(tiny_model, straight, **cfg), tmp_path).returncode == 0
    proc = run_train(base_config(tiny_model, stopped, **cfg), tmp_path, env={"WHISPER_FT_INJECT_SIGTERM": "5"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "got SIGTERM; saving a checkpoint now (the step under way is dropped" in proc.stderr
    assert "stopped by signal at step 4 (step 5 was dropped); checkpoint saved" in proc.stderr
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-4"]
    assert [r["step"] for r in metrics(stopped) if "loss" in r] == [1, 2, 3, 4]
    resumed = run_train(base_config(tiny_model, stopped, **cfg), tmp_path)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    assert train_rows(straight) == train_rows(stopped) and len(train_rows(straight)) == 6
    a, b = load_file(straight / "checkpoint-6" / "model.safetensors"), load_file(stopped / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_sigkill_at_random_moments_during_saves_leaves_a_resumable_run(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=1000, save_steps=1, eval_steps=1000, save_total_limit=2)
    rng = random.Random(7)
    for _ in range(3):
        proc = start(cfg, tmp_path)
        first = max([int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name[11:].isdigit()] or [0])
        wait_for_step(out, first + 1, proc)
        time.sleep(rng.uniform(0.0, 0.5))  # saves happen every step: this lands in or near one
        proc.kill()
        proc.wait()
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name[11:].isdigit())
    proc = run_train(cfg, tmp_path, "--stop-at-step", str(newest + 1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr
    assert not list(out.glob("checkpoint-*.tmp"))


@pytest.mark.slow
def test_nan_losses_are_skipped_and_k_in_a_row_stop_the_run(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=12, save_steps=4, eval_steps=100, max_nonfinite_steps=3)
    proc = run_train(cfg, tmp_path, env={"WHISPER_FT_INJECT_NAN": "2,6,7,8"})
    assert proc.returncode == 1
    assert "3 optimizer steps in a row had a NaN/inf loss" in proc.stderr and "Traceback" not in proc.stderr
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert rows[1]["nonfinite_steps"] == 0 and rows[2]["nonfinite_steps"] == 1 and rows[5]["nonfinite_steps"] == 1
    assert rows[3]["grad_norm"] is not None and rows[2]["grad_norm"] is None  # step 2 skipped, training went on
    # the poisoned steps 6-8 were not saved: the newest checkpoint is the one before them
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]


@pytest.mark.slow
def test_token_appears_in_no_output(tiny_model, tmp_path):
    token = "hf_FAKEtoken1234567890abcdef"
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=2, save_steps=2, eval_steps=2, hf_token=token,
                      report_to="tensorboard")
    proc = run_train(cfg, tmp_path, env={"HF_TOKEN": token + "ENV"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert token not in proc.stdout + proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in files) and any(p.name == "config.yaml" for p in files)
    leaked = [p for p in files if token.encode() in p.read_bytes()]
    assert leaked == []


@pytest.mark.slow
def test_two_processes_agree_on_bad_samples(tiny_model, tmp_path):
    """Bad samples drawn on either process are counted once, the same on both (no deadlock, no double count)."""
    from conftest import BAD

    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, dataset_name=str(BAD / "manifest.csv"), per_device_train_batch_size=5,
                      max_steps=2, save_steps=2, eval_strategy="no", load_best_model_at_end=False,
                      max_bad_sample_fraction=0.9)
    proc = run_train(cfg, tmp_path, launcher=torchrun(),
                     env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = metrics(out)[-1]
    # 21 rows (12 usable, 9 not) shared by 2 processes: one epoch draws 20 of them, so 8 or 9 bad
    assert final["bad_samples"] in (8, 9) and sum(final["bad_samples_by_reason"].values()) == final["bad_samples"]
    assert final["samples_seen"] + final["bad_samples"] == 20
    assert proc.stderr.count("skipped ") >= 5  # the first few are named as they happen


@pytest.mark.slow
def test_edited_mixture_file_on_resume_is_refused(tiny_model, tmp_path):
    from conftest import CV_AS, CV_EN

    mixture = tmp_path / "mix.yaml"
    mixture.write_text(f"- name: {CV_EN}\n  eval_split: dev\n")
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, dataset_name=str(mixture), max_steps=4, save_steps=2, eval_steps=100)
    assert run_train(cfg, tmp_path, "--stop-at-step", "2").returncode == 0
    mixture.write_text(f"- name: {CV_EN}\n  eval_split: dev\n- name: {CV_AS}\n  eval_split: dev\n")
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"the sources listed in {mixture} changed" in proc.stderr


def wait_for_text(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    seen, deadline = "", time.time() + timeout
    while text not in seen:
        assert time.time() < deadline and proc.poll() is None, seen[-2000:]
        seen += proc.stderr.readline()
    return seen


@pytest.mark.slow
def test_signal_during_evaluation_abandons_it_and_the_resume_evaluates_again(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=1000, save_steps=1000, eval_steps=1000, eval_at_start=True,
                      predict_with_generate=True, generation_max_length=200, per_device_eval_batch_size=1,
                      metric_for_best_model="wer")
    proc = start(cfg, tmp_path)
    wait_for_text(proc, "evaluation samples")  # printed just before the step-0 evaluation starts
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    assert "during the evaluation at step 0" in err
    assert not (out / "metrics.jsonl").exists() or "eval_wer" not in (out / "metrics.jsonl").read_text()
    resumed = run_train({**cfg, "generation_max_length": 8}, tmp_path, "--stop-at-step", "1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = metrics(out)
    assert [r["step"] for r in rows if "eval_wer" in r] == [0] and rows[-1]["step"] == 1


def test_a_second_ctrl_c_exits_at_once_but_a_repeated_sigterm_keeps_saving():
    """The handler itself: the first signal asks for a save at the next step; a second Ctrl-C exits now, while
    a SIGTERM that arrives again (a process group's kill plus a launcher passing it on) changes nothing."""
    import pytest

    import torch

    from whisper_ft.stopping import GracefulStop

    class OneProcess:
        num_processes, device = 1, torch.device("cpu")

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = GracefulStop(OneProcess())
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGINT)
        assert exited.value.code == 128 + signal.SIGINT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_messages_go_to_stdout_once_stderr_has_no_reader():
    """A launcher that pipes stderr and dies first must not turn "saved checkpoint-N" into a BrokenPipeError."""
    code = ("import os, sys\n"
            "from whisper_ft.reporting import survive_a_closed_stderr\n"
            "survive_a_closed_stderr()\n"
            "r, w = os.pipe(); os.close(r)\n"
            "sys.stderr.stream = os.fdopen(w, 'w')\n"  # stderr's reader is gone
            "print('saved checkpoint-7', file=sys.stderr, flush=True)\n"
            "print('stopped by signal', file=sys.stderr, flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["saved checkpoint-7", "stopped by signal"]


@pytest.mark.slow
def test_a_sigterm_to_accelerate_launch_alone_saves_and_the_run_resumes(tiny_model, tmp_path):
    """What Kubernetes and many schedulers do: SIGTERM to the job's first process, `accelerate launch`, only.
    accelerate 1.16+ passes it on (then SIGKILLs after 5 s); older versions died alone and left the trainer
    running, which now stops through its parent-death signal. Either way: a checkpoint, then a resume. The
    data workers get no signal of their own here, and one is used so that their shutdown is covered."""
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=1000, save_steps=1000, eval_steps=1000, dataloader_num_workers=1)
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.Popen([accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_loop.py"),
                             "--config", str(path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        wait_for_step(out, 2, proc)
        proc.send_signal(signal.SIGTERM)
        said, _ = proc.communicate(timeout=120)  # until every writer, the trainer included, has closed the pipe
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "got SIGTERM" in said and "checkpoint saved" in said, said[-3000:]
    assert "Traceback (most recent call last)" not in said.split("got SIGTERM")[1], said[-3000:]
    saved = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
    assert len(saved) == 1 and saved[0] >= 2 and (out / f"checkpoint-{saved[0]}" / "COMPLETE").is_file(), saved
    resumed = run_train(cfg, tmp_path, "--stop-at-step", str(saved[0] + 1))
    assert resumed.returncode == 0 and f"resumed from {out / f'checkpoint-{saved[0]}'}" in resumed.stderr, \
        resumed.stderr[-2000:]


@pytest.mark.slow
def test_truncated_newest_weights_resume_from_the_older_checkpoint(tiny_model, tmp_path):
    """A newest checkpoint whose model.safetensors was cut short ended the run in a SafetensorError
    traceback; now it is named, kept on disk, and the run resumes from the one before."""
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=6, save_steps=2, eval_steps=100, save_total_limit=0)
    assert run_train(cfg, tmp_path, "--stop-at-step", "4").returncode == 0
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    proc = run_train(cfg, tmp_path, "--stop-at-step", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping checkpoint-4: unreadable (model.safetensors: " in proc.stderr
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stderr and "Traceback" not in proc.stderr
    assert weights.is_file() and (out / "checkpoint-3" / "COMPLETE").is_file()


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so_and_exports_nothing_again(tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=2, save_steps=2, eval_steps=2)
    assert run_train(cfg, tmp_path).returncode == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "this run is finished: checkpoint-2 is at max_steps 2" in proc.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_launch_sh_on_the_cpu_stops_on_its_printed_command_and_the_same_command_resumes(tiny_model, tmp_path):
    """bash launch.sh cpu: in the background, stopped with the `kill -TERM -- -PGID` it prints, rerun to finish."""
    out = tmp_path / "run"
    config = tmp_path / "launch.yaml"
    # a data worker too: the group's signal reaches it, and it must leave the stop to the trainer
    config.write_text(yaml.safe_dump(base_config(tiny_model, out, max_steps=40, save_steps=1000, eval_steps=1000,
                                                 dataloader_num_workers=1)))
    env = {**os.environ, "CONFIG": str(config), "LOG": str(tmp_path / "train.log"), "PYTHONUNBUFFERED": "1",
           # the `accelerate` command of this interpreter's environment, even where its bin folder is not on PATH
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}

    def launch() -> int:
        said = subprocess.run(["bash", str(ROOT / "launch.sh"), "cpu"], env=env, capture_output=True, text=True,
                              timeout=60, check=True).stdout
        assert "started training on the CPU" in said
        pgid = int(said.split("kill -TERM -- -")[1].split()[0])
        assert (tmp_path / "train.pid").read_text().strip() == str(pgid)
        return pgid

    def wait_gone(pgid: int, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)
        raise AssertionError("launch.sh's run did not end: " + (tmp_path / "train.log").read_text()[-2000:])

    pgid = launch()
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").exists() and '"loss"' in (out / "metrics.jsonl").read_text()):
        assert time.time() < deadline, (tmp_path / "train.log").read_text()[-2000:]
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGTERM)
    wait_gone(pgid)
    log = (tmp_path / "train.log").read_text()
    assert "training on cpu" in log and "got SIGTERM" in log and "checkpoint saved" in log, log[-2000:]
    saved = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
    assert len(saved) == 1 and 1 <= saved[0] < 40, saved

    wait_gone(launch())
    log = (tmp_path / "train.log").read_text()
    assert f"resumed from {out / f'checkpoint-{saved[0]}'}" in log and "Traceback" not in log, log[-2000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 41))
