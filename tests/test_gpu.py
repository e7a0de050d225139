"""What only a CUDA GPU can run. CI has none, so these skip there; on a GPU machine:

    HF_HUB_OFFLINE=1 python -m pytest -q tests/test_gpu.py        # a few minutes on one GPU

- FSDP and DeepSpeed ZeRO-2/3 through the shipped accelerate configs at world size 1: a compiled run, a stop and
  a resume, the best checkpoint reloaded at the end, and a whole exported model that reproduces its evaluation.
- A training step queued on CUDA reads nothing back (speed.Readback's pinned copies and event, the fused AdamW's
  found_inf): the CPU test counts the same op, but only here does a read-back wait for a GPU.
- Evaluation's greedy step compiled into a CUDA graph over the static cache gives generate()'s tokens, in fp32.

fp32 throughout. Sharded, compiled and resumed runs are compared with a tolerance (rel 1e-4), not bit for bit:
compiled kernels sum in another order, and some GPU backward kernels (attention's) accumulate with atomics.
"""

import importlib.util
import json
import sys

import pytest
import torch
import yaml

from conftest import CV_EN, ROOT, assert_queued_without_readbacks, base_config, metrics, run_train, train_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on a GPU machine")


def launch(config_file: str) -> list[str]:
    """accelerate launch with a shipped config, on one GPU."""
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
            str(ROOT / "accelerate_configs" / config_file), "--num_processes", "1"]


def close_rows(a: list[tuple], b: list[tuple], rel: float = 1e-4) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[2] == y[2] and abs(x[1] - y[1]) <= rel * abs(x[1])
                                    for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_sharded_run_resumes_reloads_the_best_and_exports_a_whole_model(config_file, tiny_model, tmp_path):
    """greater_is_better turned round makes the first evaluation (step 2) the best while the loss falls, so
    finish() reloads checkpoint-2 under the sharding, then gathers and exports it. A learning rate high enough
    to make a later evaluation worse would also make the runs chaotic: the tolerance would have to go.
    The straight run compiles its forward (torch_compile's default on a GPU) under the sharding; the resumed and
    the plain runs are eager."""
    if config_file.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed)")
    cfg = dict(max_steps=6, eval_steps=2, save_steps=2, greater_is_better=True, save_total_limit=0,
               torch_compile="false")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = run_train(base_config(tiny_model, straight, **{**cfg, "torch_compile": "true"}), tmp_path,
                      launcher=launch(config_file))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "torch_compile on" in first.stderr and "compilation failed" not in first.stderr
    for stop in (4, 6):
        proc = run_train(base_config(tiny_model, resumed, **cfg), tmp_path, "--stop-at-step", str(stop),
                         launcher=launch(config_file))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "exporting that model" in proc.stderr
    plain = tmp_path / "plain"  # the same run in one plain process: sharding must change no number
    assert run_train(base_config(tiny_model, plain, **cfg), tmp_path).returncode == 0
    assert close_rows(train_rows(plain), train_rows(straight)) and close_rows(train_rows(plain), train_rows(resumed))

    from safetensors.torch import load_file
    from whisper_ft.cli.evaluate import main as evaluate_main

    for out in (straight, resumed):
        evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
        assert len(evals) == 3 and evals[0] > evals[1] > evals[2]  # falling: step 2 is the "best"
        exported, reference = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
        assert exported.keys() == reference.keys()  # whole: every weight, none sharded or missing
        assert all(exported[k].shape == reference[k].shape and exported[k].dtype == torch.float32 for k in exported)
        config = tmp_path / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump(base_config(tiny_model, out, **cfg)))
        assert evaluate_main(["--config", str(config)]) == 0
        summary = json.loads((out / "eval" / "final-dev" / "summary.json").read_text())
        assert summary["metrics"]["eval_loss"] == pytest.approx(evals[0], rel=1e-4)  # step 2's model


def test_a_training_step_on_cuda_is_queued_without_reading_anything_back(tiny_model, tmp_path):
    """tests/test_speed.py's count, on CUDA: the step's NaN/inf test on the device, its loss read one step late."""
    proc = assert_queued_without_readbacks(tiny_model, tmp_path, torch_compile="false")
    assert "training on cuda:0 (" in proc.stderr


def test_compiled_greedy_step_gives_the_tokens_of_generate_on_cuda(tiny_model):
    """The step compiled into a CUDA graph (mode reduce-overhead) over the static cache, fp32, every clip."""
    from whisper_ft import batches, greedy
    from whisper_ft.collate import Collator
    from whisper_ft.config import Config
    from whisper_ft.data import Prepare
    from whisper_ft.languages import resolve
    from whisper_ft.model import generate_kwargs, load_whisper
    from whisper_ft.sources import load_records
    from whisper_ft.speed import generation_speedups

    processor, model = load_whisper(str(tiny_model), resolve("en"), "transcribe")
    model = model.cuda().eval()
    records = load_records(str(CV_EN), "train")
    loader = batches.eval_loader(records, Prepare(processor.feature_extractor, processor.tokenizer),
                                 Collator(model.config.decoder_start_token_id),
                                 Config(per_device_eval_batch_size=8, dataloader_num_workers=0), 0, 1)
    kwargs = generate_kwargs(model, 30)
    compiled = greedy.Greedy(model, processor.tokenizer.prefix_tokens, {**kwargs, **generation_speedups(True)}, rows=8)
    assert compiled.compiled is not None
    eos, compared = model.generation_config.eos_token_id, 0
    for batch in loader:
        features = batch["input_features"].cuda()
        mask = torch.ones(features.shape[::2], dtype=torch.long, device="cuda")
        expected = model.generate(input_features=features, attention_mask=mask, **kwargs).tolist()
        for a, c in zip(expected, compiled(features).tolist()):
            ended = a[: a.index(eos) + 1] if eos in a else a
            assert c[: len(ended)] == ended and set(c[len(ended):]) <= {eos}
            compared += 1
    assert compared == len(records) == 25
