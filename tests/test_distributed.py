"""Several machines, on CPU: two torchrun "machines" on localhost (gloo) against one process; where several
processes sum the step's counts; and the FSDP/DeepSpeed combinations that are refused before anything starts
(FSDP and DeepSpeed themselves run in tests/test_gpu.py, on a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, base_config, free_port, metrics, run_train, torchrun, train_rows


def run_two_machines(cfgs: list[dict], tmp, *args: str, timeout: int = 300) -> list[tuple[int, str]]:
    """torchrun --nnodes 2 --nproc_per_node 1, one launcher per "machine", both started at once.

    cfgs holds one config per machine (the same one twice, except where a test gives each its own).
    """
    port = free_port()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for rank, cfg in enumerate(cfgs):
        path = tmp / f"machine{rank}-{abs(hash(json.dumps(cfg, sort_keys=True))) % 10**8}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             str(ROOT / "train_loop.py"), "--config", str(path), *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            results.append((proc.wait(timeout=timeout), proc.stderr.read()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return results


@pytest.mark.slow
def test_two_machines_stop_resume_and_match_one_machine_bit_for_bit(tiny_model, tmp_path):
    """2 machines x 1 process x batch 1 == 1 process x batch 1 x accumulation 2, exactly.

    With batch 1 the machines' micro-batches are the single process's micro-batches (the sampler deals
    sample 2k to rank 0 and 2k+1 to rank 1; one process takes them in that order), padding included. Each
    machine's gradient is 2x the single process's (the loss is scaled by world x accumulation / step
    tokens, and backward divides by accumulation): scaling by 2 is exact in floating point, and the
    all-reduce of two addends then halving gives the same bits as accumulating the two micro-batches.
    With batch > 1 the same samples fall into different micro-batches (other padding, other summation
    order), and only agreement to float rounding would hold.
    """
    cfg = dict(per_device_train_batch_size=1, max_steps=4, save_steps=2, eval_steps=2, max_eval_samples=3,
               save_total_limit=0)
    two, one = tmp_path / "two", tmp_path / "one"
    first = run_two_machines([base_config(tiny_model, two, **cfg)] * 2, tmp_path, "--stop-at-step", "2")
    assert [rc for rc, _ in first] == [0, 0], "\n".join(err[-3000:] for _, err in first)
    assert "stop_at_step 2 reached" in "".join(err for _, err in first)
    saved = sorted(p.name for p in (two / "checkpoint-2").iterdir())
    assert "random_states_0.pkl" in saved and "random_states_1.pkl" in saved  # each machine's RNG, one folder
    assert not (two / "model.safetensors").exists()
    second = run_two_machines([base_config(tiny_model, two, **cfg)] * 2, tmp_path)
    assert [rc for rc, _ in second] == [0, 0], "\n".join(err[-3000:] for _, err in second)
    assert sum("resumed from" in err for _, err in second) == 1  # said once, by the main process
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("checkpoint-", ".shared"))) == \
        ["checkpoint-2", "checkpoint-4"]  # no half-written or duplicate folders, no leftover marker

    # One thread like each machine: CPU kernels may sum in another order with another thread count, and
    # the comparison below is bit for bit.
    proc = run_train(base_config(tiny_model, one, **cfg, gradient_accumulation_steps=2), tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r[0] for r in train_rows(two)] == [1, 2, 3, 4]  # one line per step: metrics written once
    assert train_rows(two) == train_rows(one)
    a, b = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Evaluation splits the 3 samples 2 + 1 over the machines but batches all 3 together in one process:
    # the same numbers up to float rounding of differently batched matrix products.
    evals = [(r["step"], r["eval_samples"], r["eval_loss"]) for r in metrics(two) if "eval_loss" in r]
    evals1 = [(r["step"], r["eval_samples"], r["eval_loss"]) for r in metrics(one) if "eval_loss" in r]
    assert [e[:2] for e in evals] == [e[:2] for e in evals1] == [(2, 3), (4, 3)]
    assert [e[2] for e in evals] == pytest.approx([e[2] for e in evals1], rel=1e-5)

    from transformers import WhisperForConditionalGeneration
    model, info = WhisperForConditionalGeneration.from_pretrained(two, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())


@pytest.mark.slow
def test_a_signal_to_one_machine_stops_both_at_the_same_step_after_saving(tiny_model, tmp_path):
    """Preemption may signal one machine only. Its flag reaches the other in the step's totals (one all-reduce,
    batches.step_totals), so both save the same checkpoint after the same step and stop there."""
    import signal
    import time

    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, per_device_train_batch_size=2, max_steps=1000, save_steps=1000,
                      eval_strategy="no", load_best_model_at_end=False)
    port, procs = free_port(), []
    path = tmp_path / "machine.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for rank in (0, 1):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             str(ROOT / "train_loop.py"), "--config", str(path)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and '"loss"' in (out / "metrics.jsonl").read_text()):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.1)
        # the trainer itself, not its launcher: the child of machine 1's torchrun
        worker = next(int(d) for d in os.listdir("/proc") if d.isdigit() and _parent(int(d)) == procs[1].pid)
        os.kill(worker, signal.SIGTERM)
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert "got SIGTERM" in errs[1] and "got SIGTERM" not in errs[0]
    stopped = [line for line in errs[0].splitlines() if "stopped by signal at step" in line]
    assert len(stopped) == 1, errs[0][-3000:]  # said by the main process, on machine 0
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    assert saved == [f"checkpoint-{step}"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / saved[0]).iterdir()}
    assert max(r["step"] for r in metrics(out) if "loss" in r) == step  # neither went past it


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_a_checkpoint_dir_not_shared_by_the_machines_is_refused(tiny_model, tmp_path):
    """Each machine pointed at its own folder (as with a node-local disk): one clear error, no training."""
    results = run_two_machines([base_config(tiny_model, tmp_path / f"local{r}", max_steps=2) for r in (0, 1)],
                               tmp_path)
    assert [rc for rc, _ in results] != [0, 0]
    errors = "".join(err for _, err in results)
    assert "is not shared: 1 of 2 processes cannot see" in errors
    assert not any((tmp_path / f"local{r}" / "checkpoint-2").exists() for r in (0, 1))


def problems(tmp_path, env: dict, **overrides) -> str:
    from whisper_ft.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lang": "en", "whisper_pretrained": "x", "hf_token": "-", **overrides}))
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(path)], env=env, training=True)
    return str(e.value)


def test_processes_on_one_machine_sum_the_step_counts_on_the_host(monkeypatch):
    """Summed on a GPU, the step's counts could only be read back after the step before had finished (DESIGN:
    host syncs). With every process on one machine they are summed over gloo on the host; across machines, on
    the device (gloo there would have to find the network interface by itself). The two-process runs elsewhere
    check that training through either path gives the one-process results."""
    import torch.distributed as dist

    from whisper_ft import batches

    class GPUs:  # two NCCL processes; the counts must not be summed through accelerate on the device
        num_processes, device = 2, "cuda:0"

        def reduce(self, *args, **kwargs):
            raise AssertionError("the step's counts were summed on the device")

    micro = [{"tokens": 7, "ids": ["a", "b"], "seconds": 3.5, "bad": []},
             {"tokens": 5, "ids": ["c"], "seconds": 1.0, "bad": ["d"]}]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:  # a real gloo all-reduce, of one rank here
        assert batches.step_totals(micro, GPUs(), True, dist.group.WORLD) == (12, 3, 4.5, 1, 4, True)
    finally:
        dist.destroy_process_group()
    made = []
    monkeypatch.setattr(dist, "get_backend", lambda *args: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.append(kwargs) or "a gloo group")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # both processes on this machine
    assert batches.count_group(GPUs()) == "a gloo group" and made == [{"backend": "gloo"}]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two machines of one process each
    assert batches.count_group(GPUs()) is None


def test_fsdp_on_cpu_is_refused_not_silently_turned_into_data_parallelism(tmp_path):
    message = problems(tmp_path, {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "true",
                                  "FSDP_ACTIVATION_CHECKPOINTING": "true"}, gradient_checkpointing=True,
                       predict_with_generate=True, eval_strategy="steps")
    assert "FSDP needs CUDA GPUs" in message
    assert "both checkpoint activations" in message
    assert "predict_with_generate is not supported with FSDP" in message


def test_deepspeed_problems_are_reported_together(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"},
                              "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto"}))
    ds.write_text(json.dumps({**json.loads(ds.read_text()), "zero_optimization": {"stage": 3}}))
    message = problems(tmp_path, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds),
                                  "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
                       per_device_train_batch_size=2, gradient_accumulation_steps=1, predict_with_generate=True)
    import importlib.util
    assert ("pip install deepspeed" in message) == (importlib.util.find_spec("deepspeed") is None)
    assert "'optimizer' section" in message and "'scheduler' section" in message
    assert "train_micro_batch_size_per_gpu 8, the whisper-ft config 2" in message
    assert "gradient_accumulation_steps 4 but the whisper-ft config 1" in message
    assert "predict_with_generate is not supported with DeepSpeed ZeRO-3" in message


@pytest.mark.slow
def test_zero3_without_init_flag_loads_the_whole_model_then_registers_deepspeed_again(monkeypatch):
    """accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says, and under ZeRO-3
    from_pretrained then partitions the model as it builds it, which fails for Whisper (DESIGN: ZeRO-3 loading).
    sharding.whole_model_load lifts that registration for the load and restores it. DeepSpeed itself is not in
    CI: the registration is a stand-in with what transformers reads of it (is_zero3). With DeepSpeed installed,
    the whole ZeRO-3 run is tests/test_gpu.py's."""
    import weakref

    import transformers.integrations.deepspeed as hf_ds
    from transformers.integrations import is_deepspeed_zero3_enabled

    from whisper_ft import sharding

    class Registered:  # transformers' HfDeepSpeedConfig, as is_deepspeed_zero3_enabled reads it
        def is_zero3(self):
            return True

    class Plugin:  # accelerate's DeepSpeedPlugin: its config, its flag, and its registration with transformers
        def __init__(self, stage, init_flag):
            self.deepspeed_config, self.init_flag = {"zero_optimization": {"stage": stage}}, init_flag
            self.set_deepspeed_weakref()

        def is_zero3_init_enabled(self):
            return self.init_flag

        def set_deepspeed_weakref(self):
            self.dschf = Registered()
            monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", weakref.ref(self.dschf))

    class Accelerator:
        def __init__(self, plugin):
            self.state = type("State", (), {"deepspeed_plugin": plugin})()

    for init_flag, seen_while_loading in ((False, False), (True, True)):  # zero.Init only when the flag asks
        accelerator = Accelerator(Plugin(3, init_flag))
        with sharding.whole_model_load(accelerator):
            assert is_deepspeed_zero3_enabled() is seen_while_loading
        assert is_deepspeed_zero3_enabled()  # registered again for the rest of the run
    with pytest.raises(RuntimeError):  # restored even when the load fails
        with sharding.whole_model_load(Accelerator(Plugin(3, False))):
            raise RuntimeError("no such model")
    assert is_deepspeed_zero3_enabled()
    with sharding.whole_model_load(Accelerator(Plugin(2, False))):  # not ZeRO-3: the registration is left alone
        assert hf_ds._hf_deepspeed_config_weak_ref() is not None


@pytest.mark.slow
def test_fsdp2_sharded_model_evaluates_and_exports_like_the_plain_one(tiny_model, tmp_path):
    """Evaluation on uneven shards (placeholder batches) and the gathered export, under FSDP2 on CPU.

    accelerate runs FSDP only on GPUs; the worker shards with torch's fully_shard as accelerate does, then
    calls whisper-ft's own evaluate() and export. 5 samples on 2 processes are 2 batches on one and 1 on the
    other: without the placeholder the second process would stop joining the weight gathers and both hang.
    """
    proc = subprocess.run(
        torchrun() + [str(ROOT / "tests" / "workers" / "fsdp2_eval_export.py"), str(tiny_model), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["type"].startswith("FSDP")  # it really was sharded
    (plain, plain_rows), (sharded, rows) = result["plain"], result["sharded"]
    assert rows == plain_rows and len(rows) == 5  # each sample once
    assert sharded["eval_samples"] == 5 and sharded["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)

    from transformers import WhisperForConditionalGeneration
    exported, info = WhisperForConditionalGeneration.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())
    assert exported.config.architectures == ["WhisperForConditionalGeneration"]
    original = WhisperForConditionalGeneration.from_pretrained(tiny_model).state_dict()
    assert exported.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in exported.state_dict().items())
