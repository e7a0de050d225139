"""A hostile new user: mistaken or broken inputs against train_loop.py and the CLIs, each outcome classified.

    python bench/hostile.py [--root TREE] [--only NAME ...]

--root is a whisper-ft tree to test (default: this one). Run it on copies, never on a working tree others use:
several cases point checkpoint_dir at the tree's own root. Each case runs the real command with a tiny random
Whisper (whisper_ft.tiny) and the committed clips, offline, and is counted as exactly one of:

  data loss       a file that was there before is changed or gone
  traceback       a Python traceback reached the user
  silent nonsense exit 0 without the message the case calls for
  wrong blame     a non-zero exit whose message does not name the real problem
  clear message   the message names the problem (non-zero exit), or the sensible thing was done and said (exit 0)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

CLASSES = ("data loss", "traceback", "silent nonsense", "wrong blame", "clear message")


@dataclass
class Case:
    name: str
    setup: Callable  # (Env) -> (argv after `python`, folders watched for data loss, env overrides)
    expect: str  # regex the output must contain
    exit_zero: bool = False  # the sensible outcome is exit 0 (with the expected message)


class Env:
    def __init__(self, root: Path, tmp: Path, model: Path):
        self.root, self.tmp, self.model = root, tmp, model
        self.n = 0

    def folder(self, name: str) -> Path:
        self.n += 1
        path = self.tmp / f"{self.n:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def config(self, where: Path, out: Path, name: str = "train.yaml", **overrides) -> Path:
        cfg = {"lang": "en", "whisper_pretrained": str(self.model), "checkpoint_dir": str(out),
               "dataset_name": str(self.root / "tests" / "data" / "cv-en"), "train_split": "train",
               "eval_split": "dev", "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
               "learning_rate": 2e-3, "warmup_steps": 1, "max_steps": 6, "eval_steps": 3, "save_steps": 3,
               "logging_steps": 1, "gradient_checkpointing": False, "fp16": False, "bf16": False,
               "dataloader_num_workers": 0, "report_to": "none", "eval_at_start": False,
               "predict_with_generate": False, "metric_for_best_model": "loss", "max_eval_samples": 4}
        cfg.update(overrides)
        path = where / name
        path.write_text("# my own commented config\n" + yaml.safe_dump(cfg), encoding="utf-8")
        return path

    def train(self, config: Path, *flags: str) -> list[str]:
        return [str(self.root / "train_loop.py"), "--config", str(config), *flags]

    def stopped_run(self, name: str) -> tuple[Path, Path]:
        """A run stopped at step 3 by this tree's own code: (its config, its folder)."""
        where = self.folder(name)
        out = where / "run"
        config = self.config(where, out, eval_strategy="no", load_best_model_at_end=False)
        proc = run(self, self.train(config, "--stop-at-step", "3"), {})
        if not (out / "checkpoint-3").is_dir():
            raise SystemExit(f"could not make a run to break: {proc.stderr[-2000:]}")
        return config, out

    def finished_run(self, name: str) -> tuple[Path, Path]:
        """A run trained to its end (the final model in its folder) beside a sibling run: (their parent, the run).
        Trained once per bench and copied, so each export case breaks its own copy."""
        if not hasattr(self, "_finished"):
            where = self.tmp / "finished"
            where.mkdir(parents=True)
            out = where / "run"
            config = self.config(where, out, max_steps=3, eval_strategy="no", load_best_model_at_end=False)
            proc = run(self, self.train(config), {})
            if not (out / "model.safetensors").is_file():
                raise SystemExit(f"could not make a finished run: {proc.stderr[-2000:]}")
            self._finished = out
        parent = self.folder(name)
        shutil.copytree(self._finished, parent / "run")
        shutil.copytree(self._finished, parent / "sibling-run")
        return parent, parent / "run"


def run(env: Env, argv: list[str], extra: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(env.root), "TOKENIZERS_PARALLELISM": "false",
            **extra}
    return subprocess.run([sys.executable, *argv], cwd=env.root, capture_output=True, text=True, timeout=600,
                          env=full)


def checksums(folders: list[Path]) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")) if Path(folder).is_dir() else [Path(folder)]:
            if p.is_file() and "__pycache__" not in p.parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---- the cases ----

def _into_model(env):
    where = env.folder("into-model")
    model = Path(shutil.copytree(env.model, where / "my-model"))
    return env.train(env.config(where, model, whisper_pretrained=str(model))), [model, where], {}


def _into_config_folder(env):
    where = env.folder("into-config-folder")
    (where / "notes.md").write_text("my notes\n")
    return env.train(env.config(where, where, name="config.yaml")), [where], {}


def _into_repo(env):
    where = env.folder("into-repo")
    return env.train(env.config(where, env.root)), [env.root / "README.md", env.root / "config.yaml", env.root / "whisper_ft", where], {}


def _into_other_model(env):
    where = env.folder("into-other-model")
    other = Path(shutil.copytree(env.model, where / "other-model"))
    return env.train(env.config(where, other)), [other, where], {}


def _parent_is_file(env):
    where = env.folder("parent-file")
    (where / "a-file").write_text("x")
    return env.train(env.config(where, where / "a-file" / "run")), [where], {}


def _broken_state(content: str):
    def setup(env):
        config, out = env.stopped_run("broken-state")
        shutil.copytree(out / "checkpoint-3", out / "checkpoint-6")
        (out / "checkpoint-6" / "COMPLETE").write_text("6")
        (out / "checkpoint-6" / "trainer_state.json").write_text(content)
        return env.train(config), [out / "checkpoint-3", out / "checkpoint-6"], {}
    return setup


def _only_checkpoint_broken(env):
    config, out = env.stopped_run("only-broken")
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    return env.train(config), [out], {}


def _into_dataset(env):
    where = env.folder("into-dataset")
    data = Path(shutil.copytree(env.root / "tests" / "data" / "cv-en", where / "my-corpus"))
    return env.train(env.config(where, data, dataset_name=str(data))), [data, where], {}


def _misspelled_key(env):
    where = env.folder("misspelled")
    config = env.config(where, where / "run")
    config.write_text(config.read_text().replace("learning_rate:", "learnig_rate:"))
    return env.train(config), [where], {}


def _missing(command: str):
    def setup(env):
        where = env.folder(f"missing-{command}")
        if command == "config":
            argv = env.train(where / "no-such.yaml")
        elif command == "transcribe":
            argv = ["-m", "whisper_ft.cli.transcribe", "--model", str(env.model), str(where / "no-such.wav")]
        else:
            argv = ["-m", "whisper_ft.cli.evaluate", "--model", str(where / "no-such-model"), "--config",
                    str(env.config(where, where / "run"))]
        return argv, [where], {}
    return setup


def _disk_full(env):
    config, out = env.stopped_run("disk-full")
    wrapper = ("import sys, torch\n"
               "def full(obj, f, *a, **k):\n"
               "    open(f, 'wb').write(b'PK partial')\n"
               "    raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed')\n"
               "torch.save = full\n"
               f"sys.argv = ['train_loop.py', '--config', {str(config)!r}]\n"
               "import train_loop\n"
               "sys.exit(train_loop.main())\n")
    return ["-c", wrapper], [out / "checkpoint-3"], {}


def _setting(name: str, **overrides):
    def setup(env):
        where = env.folder(name)
        return env.train(env.config(where, where / "run", **overrides)), [where], {}
    return setup


def _duplicate_key(env):
    where = env.folder("duplicate-key")
    config = env.config(where, where / "run")
    config.write_text(config.read_text() + "max_steps: 60\n")
    return env.train(config), [where], {}


def _manifest(where: Path, env: Env, train_rows: int, eval_good: bool) -> Path:
    good = sorted((env.root / "tests" / "data" / "bad" / "good").glob("*.mp3"))
    rows = ["path,text,split"] + [f"{good[i % len(good)]},the cat sat down,train" for i in range(train_rows)]
    evals = [str(g) for g in good[:2]] if eval_good else \
        [str(env.root / "tests" / "data" / "bad" / n) for n in ("corrupt.mp3", "truncated.mp3")]
    rows += [f"{e},the cat sat down,dev" for e in evals]
    path = where / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _one_row(env):
    where = env.folder("one-row")
    data = _manifest(where, env, 1, True)
    return env.train(env.config(where, where / "run", dataset_name=str(data), max_steps=3, eval_steps=3)), [where], {}


def _eval_unusable(env):
    where = env.folder("eval-unusable")
    data = _manifest(where, env, 25, False)
    return env.train(env.config(where, where / "run", dataset_name=str(data), max_steps=4, eval_steps=2)), [where], {}


def _stop_at_step_rerun(env):
    config, out = env.stopped_run("stop-rerun")
    return env.train(config, "--stop-at-step", "3"), [out], {}


def _tsv_with_commas(env):
    where = env.folder("tsv-commas")
    data = _manifest(where, env, 10, True)
    tsv = data.with_suffix(".tsv")
    data.rename(tsv)
    return env.train(env.config(where, where / "run", dataset_name=str(tsv))), [where], {}


def _evaluate(model_of: Callable, name: str):
    def setup(env):
        where = env.folder(name)
        model, watched = model_of(env, where)
        config = env.config(where, where / "eval-out")
        return ["-m", "whisper_ft.cli.evaluate", "--config", str(config), "--model", str(model)], watched, {}
    return setup


def _lora_checkpoint(env, where):
    config, out = env.stopped_run("lora")
    state = out / "checkpoint-3" / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["config"]["lora_r"] = 8  # what a LoRA run's checkpoint says; its weights are the adapter's only
    state.write_text(json.dumps(saved))
    return out / "checkpoint-3", [out]


def _state_list_checkpoint(env, where):
    config, out = env.stopped_run("state-list")
    (out / "checkpoint-3" / "trainer_state.json").write_text("[1, 2]")
    return out / "checkpoint-3", [out]


def _truncated_model(env, where):
    model = Path(shutil.copytree(env.model, where / "final"))
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return model, [model]


def _other_architecture(env, where):
    from safetensors.torch import save_file
    import torch

    model = Path(shutil.copytree(env.model, where / "final"))
    save_file({"wav2vec2.encoder.layer.0.weight": torch.zeros(4, 4)}, str(model / "model.safetensors"))
    return model, [model]


def _evaluate_into_user_folder(env):
    where = env.folder("evaluate-output")
    mine = where / "my-results"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "notes"}\n')
    config = env.config(where, where / "run")
    return ["-m", "whisper_ft.cli.evaluate", "--config", str(config), "--model", str(env.model), "--output-dir",
            str(mine)], [mine], {}


def _export(into: str):
    """export --model RUN --force into the run itself, its parent (which holds a sibling run), or a user's folder."""
    def setup(env):
        parent, model = env.finished_run("export-into-" + into)
        out = {"run": model, "parent": parent, "folder": parent / "my-files"}[into]
        if into == "folder":
            out.mkdir()
            (out / "notes.txt").write_text("mine\n")
        return (["-m", "whisper_ft.cli.export", "--model", str(model), "--format", "ctranslate2", "--output-dir",
                 str(out), "--force"], [parent], {})
    return setup


CASES = [
    Case("checkpoint_dir is the base model's folder", _into_model, r"holds the base model|not a whisper-ft run"),
    Case("checkpoint_dir is the config file's folder", _into_config_folder, r"holds the config file|not a whisper-ft run"),
    Case("checkpoint_dir is the repository root", _into_repo, r"repository|not a whisper-ft run"),
    Case("checkpoint_dir is another model's folder", _into_other_model, r"not a whisper-ft run"),
    Case("checkpoint_dir under a file", _parent_is_file, r"is a file, not a folder"),
    Case("newest trainer_state.json is {}", _broken_state("{}"), r"skipping checkpoint-6.*cannot be trusted", True),
    Case("newest trainer_state.json is a list", _broken_state("[1, 2]"), r"skipping checkpoint-6", True),
    Case("the only checkpoint's state is {}", _only_checkpoint_broken, r"refusing to start over"),
    Case("disk full during a save (torch.save raises)", _disk_full, r"checkpoint-6 failed .*free under"),
    Case("learning_rate: 0", _setting("lr0", learning_rate=0), r"learning_rate is 0"),
    Case("the same key twice in the YAML", _duplicate_key, r"max_steps is set twice \(lines \d+ and \d+\)"),
    Case("a training split of one row", _one_row, r"only 1 training sample", True),
    Case("an eval split with no usable sample", _eval_unusable, r"unusable.*picks the best model"),
    Case("stop_at_step already reached, rerun", _stop_at_step_rerun, r"stop_at_step 3 was already reached", True),
    Case("local model folder that does not exist", _setting("no-model", whisper_pretrained="/nonexistent/my-whisper"),
         r"no such folder|does not exist"),
    Case("Hub model not in the cache, offline", _setting("not-cached", whisper_pretrained="someone/whisper-x"),
         r"not in the (model )?cache"),
    Case("local dataset folder that does not exist", _setting("no-data", dataset_name="/nonexistent/corpus/"),
         r"does not exist"),
    Case("comma-separated file named .tsv", _tsv_with_commas, r"named \.tsv but .*comma"),
    Case("evaluate a LoRA checkpoint", _evaluate(_lora_checkpoint, "eval-lora"), r"LoRA checkpoint|adapter"),
    Case("evaluate a checkpoint whose state is a list", _evaluate(_state_list_checkpoint, "eval-list"),
         r"not a run state"),
    Case("evaluate a truncated model.safetensors", _evaluate(_truncated_model, "eval-trunc"),
         r"SafetensorError|truncated|incomplete"),
    Case("evaluate another architecture's weights", _evaluate(_other_architecture, "eval-other"),
         r"not a Whisper|architecture"),
    Case("export --output-dir is the run itself, --force", _export("run"), r"is the input model"),
    Case("export --output-dir is the run's parent, --force", _export("parent"), r"folder holding the input model"),
    Case("export --output-dir holds the user's files, --force", _export("folder"), r"did not write"),
    Case("evaluate --output-dir holding the user's summary.json", _evaluate_into_user_folder,
         r"did not write|another --output-dir"),
    Case("checkpoint_dir is the dataset's folder", _into_dataset, r"not a whisper-ft run|holds the (training )?data"),
    Case("a misspelled key in the YAML", _misspelled_key, r"learnig_rate"),
    Case("--config that does not exist", _missing("config"), r"no-such\.yaml"),
    Case("transcribe an audio file that does not exist", _missing("transcribe"), r"no-such\.wav"),
    Case("evaluate --model a folder that does not exist", _missing("evaluate"), r"no-such-model"),
]


def kept(path: str, digest: str) -> bool:
    """The file is there unchanged, or was moved aside whole (an untrusted checkpoint-N kept as checkpoint-N.skipped)."""
    p = Path(path)
    candidates = [p] + [Path(str(p).replace(f"/{part}/", f"/{part}.skipped/", 1)) for part in p.parts
                        if part.startswith("checkpoint-")]
    return any(c.is_file() and hashlib.sha256(c.read_bytes()).hexdigest() == digest for c in candidates)


def classify(case: Case, proc: subprocess.CompletedProcess, before: dict) -> str:
    if not all(kept(p, h) for p, h in before.items()):
        return "data loss"
    text = proc.stdout + proc.stderr
    if "Traceback (most recent call last)" in text:
        return "traceback"
    said = re.search(case.expect, text, re.S) is not None
    if proc.returncode == 0:
        return "clear message" if case.exit_zero and said else "silent nonsense"
    return "clear message" if said and not case.exit_zero else "wrong blame"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--only", nargs="*", default=None, help="substrings of case names to run")
    p.add_argument("--json", default="", help="write every outcome here")
    args = p.parse_args()
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    from whisper_ft import tiny

    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    cv = root / "tests" / "data" / "cv-en" / "validated.tsv"
    model = tiny.build(tmp / "tiny", tiny.texts_from_tsv(cv))
    env = Env(root, tmp / "cases", model)
    outcomes = []
    for case in CASES:
        if args.only and not any(s in case.name for s in args.only):
            continue
        argv, watched, extra = case.setup(env)
        watched = watched + [model]
        before = checksums(watched)
        proc = run(env, argv, extra)
        kind = classify(case, proc, before)
        last = next((line for line in reversed((proc.stderr or proc.stdout).strip().splitlines())
                     if line.startswith(("whisper-ft", "  -", "Error", "RuntimeError", "OSError"))), "")
        outcomes.append({"case": case.name, "outcome": kind, "exit": proc.returncode, "said": last[:300]})
        print(f"{kind:16s} exit {proc.returncode}  {case.name}: {last[:160]}", flush=True)
    counts = Counter(o["outcome"] for o in outcomes)
    print(f"\n{len(outcomes)} cases: " + ", ".join(f"{c} {counts.get(c, 0)}" for c in CLASSES))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": counts, "cases": outcomes}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
