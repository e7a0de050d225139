"""The package: `pip install .` gives the `whisper-ft` command, which runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, base_config, metrics
from whisper_ft.cli import main as cli


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    said = capsys.readouterr().out
    for name in ("train", "evaluate", "transcribe", "export", "inspect"):
        assert f"\n  {name} " in said, said


def test_a_mistyped_subcommand_is_named_with_the_nearest_one(capsys):
    assert cli.main(["evalute", "--config", "x.yaml"]) == 2
    assert "unknown command 'evalute'; did you mean 'evaluate'?" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_every_subcommand_module_has_a_main():
    import importlib

    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main), module


@pytest.mark.slow
def test_pip_install_gives_a_command_that_trains_from_another_folder(tiny_model, tmp_path):
    """What a user gets from `pip install .`: an installed copy (not this checkout) imports and trains."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(ROOT)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    where = subprocess.run([sys.executable, "-c", "import whisper_ft, train_loop; print(whisper_ft.__file__); "
                            "print(train_loop.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where
    command = site / "bin" / "whisper-ft"
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_model, out, max_steps=2, save_steps=2, eval_steps=2)))
    proc = subprocess.run([str(command), "train", "--config", str(config)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2] and (out / "model.safetensors").is_file()
