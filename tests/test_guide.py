"""The guide's (../shared/seed-guide.txt) config.yaml and command line work unchanged, and every
setting that would waste a night (a GPU that is not there, a placeholder token, a file as checkpoint_dir)
stops the run before the model loads."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CV_EN, ROOT, metrics
from whisper_ft.config import ConfigError, config_warnings, load_config, trackers

# Section 2 of the guide, verbatim.
GUIDE_CONFIG = """\
# General configuration
# (Set these to match your dataset and model preferences)
# For language codes, see: https://en.wikipedia.org/wiki/List_of_ISO_639-1_codes
lang: as  # ISO 639-1/2/3 code for both dataset and model language
dataset_name: mozilla-foundation/common_voice_11_0
dataset_cache: ./datasets
model_name: whisper-medium
model_cache: ./models
gpu_device: 1
whisper_pretrained: null  # If null, defaults to openai/<model_name>
checkpoint_name: null     # If null, defaults to <model_name>-<lang>
checkpoint_dir: null      # If null, defaults to ./checkpoints/<checkpoint_name>
hf_token: <your_hf_token> # Required: Hugging Face access token

# Training arguments (passed to Hugging Face Seq2SeqTrainingArguments)
per_device_train_batch_size: 16
gradient_accumulation_steps: 1
learning_rate: 1e-5
warmup_steps: 500
max_steps: 4000
gradient_checkpointing: true
fp16: true
eval_strategy: steps
per_device_eval_batch_size: 8
predict_with_generate: true
generation_max_length: 225
save_steps: 1000
eval_steps: 1000
logging_steps: 25
report_to:
  - tensorboard
load_best_model_at_end: true
metric_for_best_model: wer
greater_is_better: false
push_to_hub: true
"""

NO_MODEL = "/nonexistent/whisper"  # were the model loaded, this would be the error reported


def guide_file(tmp_path, text=GUIDE_CONFIG):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def train(args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train_loop.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.mark.slow
def test_guide_config_verbatim_loads(tmp_path):
    """The guide's file as it is: report_to a YAML list, 1e-5 a string to YAML 1.1, nulls for derived paths."""
    cfg = load_config(["--config", str(guide_file(tmp_path)), "--no-push-to-hub"], env={})
    assert cfg.report_to == "tensorboard" and trackers(cfg) == ["tensorboard"]
    assert cfg.learning_rate == 1e-5 and cfg.gpu_device == "1" and cfg.checkpoint_dir == "checkpoints/whisper-medium-as"
    assert cfg.whisper_pretrained == "openai/whisper-medium" and cfg.hf_token != "<your_hf_token>"


@pytest.mark.slow
def test_guide_config_trains_on_cpu_with_the_guides_long_flags(tiny_model, tmp_path):
    """Verbatim but for data, model and output paths (given with the guide's flags) and the upload: the guide's
    hf_token is its placeholder, so push_to_hub is turned off on the command line (--no-push-to-hub)."""
    out = tmp_path / "run"
    proc = train(["--config", str(guide_file(tmp_path)), "--gpu", "cpu", "--name", str(CV_EN), "--cache",
                  str(tmp_path / "datasets"), "--whisper-pretrained", str(tiny_model), "--checkpoint-dir", str(out),
                  "-t", "2", "--generation-max-length", "12", "--no-push-to-hub", "--dataloader-num-workers", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training on cpu, precision fp32, 1 process(es)" in proc.stderr
    assert "warning: warmup_steps 500 >= max_steps 2" in proc.stderr
    assert "there is no CUDA device" not in proc.stderr  # -g cpu was asked for: no fp16 warning
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [2]  # logging_steps 25: the last step is logged
    assert [r["step"] for r in rows if "eval_wer" in r and "merge_alpha" not in r] == [0, 2]
    # merge_base is on by default: the exported model is the chosen blend with the base, in one row at the end
    assert [r["step"] for r in rows if "merge_alpha" in r] == [2] and "merge_base: exporting alpha" in proc.stderr
    # trained with the cache off (gradient checkpointing); users generate, so the model folder has it on
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert list((out / "runs").rglob("events.out.tfevents*")), "report_to [tensorboard] wrote no event file"
    # quiet, readable log: no line holds both the bar and a message; no transformers generate() warning
    for line in proc.stderr.splitlines():
        assert "\r" not in line or "training:" not in line, repr(line)
        assert not ("training:" in line and ("step 2:" in line or "saved " in line)), repr(line)
    assert "step 2: wer" in proc.stderr and "generation_config" not in proc.stderr


@pytest.mark.parametrize("given,expected", [
    ("report_to: tensorboard\n", ["tensorboard"]),
    ("report_to: [tensorboard]\n", ["tensorboard"]),
    ("report_to: none\n", []),
    ("report_to: [none]\n", []),
    ("report_to: null\n", ["tensorboard"]),
])
def test_report_to_as_list_or_string(tmp_path, given, expected):
    assert trackers(load_config(["--config", str(guide_file(tmp_path, given))], env={})) == expected


def test_report_to_on_the_command_line_and_its_errors(tmp_path, monkeypatch):
    assert load_config(["--report-to", "none"], env={}).report_to == "none"
    assert load_config(["--report-to", "TensorBoard"], env={}).report_to == "tensorboard"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    for argv in (["--report-to", "tensorboard", "wandb"], ["--report-to", "tensorboard,wandb"]):
        with pytest.raises(ConfigError) as err:
            load_config(argv, env={})
        assert err.value.problems == ["report_to wandb needs the wandb package: pip install wandb "
                                      "(or remove wandb from report_to)"]
    with pytest.raises(ConfigError, match="report_to 'tensorbord' is not a tracker; choose from: none, tensorboard"):
        load_config(["--report-to", "tensorbord"], env={})
    with pytest.raises(ConfigError, match="none turns logging off; do not combine it"):
        load_config(["--report-to", "none", "tensorboard"], env={})


def test_guide_long_flags_beside_todays_names():
    guide = load_config(["--gpu", "0", "--name", "x/y", "--cache", "/c"], env={})
    ours = load_config(["--gpu-device", "0", "--dataset-name", "x/y", "--dataset-cache", "/c"], env={})
    short = load_config(["-g", "0", "-dn", "x/y", "-dc", "/c"], env={})
    assert (guide.gpu_device, guide.dataset_name, guide.dataset_cache) == ("0", "x/y", "/c")
    assert guide == ours == short


def test_config_yaml_in_the_working_folder_is_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert load_config([], env={}).lang == "as"  # the default, no config.yaml here
    assert "reading ./config.yaml" not in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("lang: hi\nmax_steps: 9\n")
    cfg = load_config([], env={})
    assert (cfg.lang, cfg.max_steps) == ("hi", 9)
    assert "no --config given; reading ./config.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "# only comments\n", "\n\n"])
def test_an_empty_config_file_is_an_error(tmp_path, text):
    with pytest.raises(ConfigError, match="config file .*c.yaml is empty"):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        load_config(["--config", str(path)], env={})


def test_warmup_at_or_over_max_steps_is_a_warning_naming_both():
    assert config_warnings(load_config(["--warmup-steps", "100", "-t", "500"], env={})) == []
    notes = config_warnings(load_config(["--warmup-steps", "500", "-t", "500"], env={}))
    assert len(notes) == 1 and notes[0].startswith("warmup_steps 500 >= max_steps 500: the learning rate never reaches")


@pytest.mark.parametrize("lang,metric,warned", [("zh", "wer", True), ("ja", "wer_ortho", True), ("th", "cer", False),
                                                ("ja", "loss", False), ("as", "wer", False)])
def test_best_model_by_wer_in_a_language_without_spaces_is_a_warning(lang, metric, warned):
    notes = config_warnings(load_config(["--lang", lang, "--metric-for-best-model", metric], env={}))
    assert any("metric_for_best_model: cer" in n for n in notes) == warned


def test_checkpoint_dir_that_is_a_file_stops_before_the_model_loads(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    proc = train(["--config", str(guide_file(tmp_path)), "--no-push-to-hub", "-g", "cpu", "-wp", NO_MODEL,
                  "-cd", str(tmp_path / "out")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint_dir {tmp_path / 'out'} is a file, not a folder" in proc.stderr
    assert NO_MODEL not in proc.stderr and "Traceback" not in proc.stderr


def absent_gpu() -> str:
    return str(max(1, torch.cuda.device_count()))  # "1" on a machine with one GPU or none


def test_gpu_that_is_not_there_stops_before_the_model_loads(tmp_path):
    proc = train(["--config", str(guide_file(tmp_path)), "--no-push-to-hub", "-g", absent_gpu(), "-wp", NO_MODEL])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"gpu_device {absent_gpu()} asked for, but " in proc.stderr and "-g cpu" in proc.stderr
    if not torch.cuda.is_available():
        assert "there is no CUDA GPU on this machine" in proc.stderr
    assert NO_MODEL not in proc.stderr and "Traceback" not in proc.stderr


def test_accelerate_gpu_ids_naming_an_absent_gpu_stops_before_the_model_loads(tmp_path):
    """accelerate launch --gpu_ids N sets CUDA_VISIBLE_DEVICES=N; torch then sees no GPU and would use the CPU."""
    proc = train(["--config", str(guide_file(tmp_path)), "--no-push-to-hub", "--gpu", "", "-wp", NO_MODEL],
                 env={"CUDA_VISIBLE_DEVICES": str(max(1, torch.cuda.device_count()))})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CUDA_VISIBLE_DEVICES=" in proc.stderr and "accelerate launch --gpu_ids" in proc.stderr
    assert "-g cpu" in proc.stderr and NO_MODEL not in proc.stderr and "Traceback" not in proc.stderr


def test_placeholder_token_with_push_to_hub_stops_before_the_model_loads(tmp_path):
    proc = train(["--config", str(guide_file(tmp_path)), "-g", "cpu", "-wp", NO_MODEL],
                 env={"HF_TOKEN": "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"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hf_token is still the placeholder '<your_hf_token>'" in proc.stderr
    assert NO_MODEL not in proc.stderr and "Traceback" not in proc.stderr
    assert "hf_realLooking" not in proc.stderr


def test_placeholder_token_without_push_is_never_used():
    cfg = load_config(["--hf-token", "<your_hf_token>"], env={"HF_TOKEN": "hf_fromenv"})
    assert cfg.hf_token == "hf_fromenv"


def test_each_gpu_asked_for_must_be_seen(monkeypatch):
    """CUDA stops enumerating at the first missing id: CUDA_VISIBLE_DEVICES=0,5 on a 2-GPU machine shows one."""
    from whisper_ft import device

    cfg = load_config(["--gpu", ""], env={})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(device, "_gpus_here", lambda env: "this machine's GPUs are 0: A; 1: B")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=0,5 .* but this machine's GPUs are 0: A; 1: B"):
        device.choose(cfg, {"CUDA_VISIBLE_DEVICES": "0,5"})
    assert device.choose(cfg, {"CUDA_VISIBLE_DEVICES": "1"}) is False  # one asked, one seen
    env = {}
    with pytest.raises(ConfigError, match="gpu_device 1 asked for, but this machine's GPUs are"):
        device.choose(load_config(["-g", "1"], env={}), env)
    assert device.choose(load_config(["-g", "0"], env={}), env) is False and env["CUDA_VISIBLE_DEVICES"] == "0"
    env = {}
    assert device.choose(load_config(["-g", "cpu"], env={}), env) is True
    assert env == {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}


@pytest.mark.slow
def test_gpu_device_under_accelerate_launch(monkeypatch):
    """The guide's `gpu_device: 1` must not land on GPU 0 when accelerate launch was given no --gpu_ids."""
    from whisper_ft import device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    one = load_config(["-g", "1"], env={})
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}  # launched, no --gpu_ids: the config chooses
    assert device.choose(one, env) is False and env["CUDA_VISIBLE_DEVICES"] == "1"
    with pytest.raises(ConfigError, match="names 1 GPU.* for 2 processes"):
        device.choose(one, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": "0"}  # --gpu_ids 0 wins
    with pytest.warns(UserWarning, match="gpu_device 1 is ignored: CUDA_VISIBLE_DEVICES=0"):
        assert device.choose(one, env) is False
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
