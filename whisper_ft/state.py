"""The training run's state: one object that the loop updates and a checkpoint saves and loads whole.

RunState is what checkpoint.py writes as trainer_state.json (the JSON keys are the on-disk format:
keep them readable by older checkpoints). A resumed run is first checked to be the same run
(IDENTITY: the settings that change what is trained); improves() is the best-model test.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whisper_ft.config import Config
from whisper_ft.data import BadCounter
from whisper_ft.exit_codes import Exit
from whisper_ft.stopping import RunStopped


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    best_metric: float | None = None  # of metric_for_best_model, over the evaluations after step 0
    best_step: int | None = None
    samples_seen: int = 0  # usable training samples of all processes
    audio_seconds_seen: float = 0.0
    nonfinite_in_row: int = 0  # NaN/inf losses in a row (the run stops at max_nonfinite_steps)
    nonfinite_steps: int = 0
    bad: BadCounter = field(default_factory=BadCounter)  # unusable training samples, counted when drawn
    base_metrics: dict[str, Any] | None = None  # the evaluation at step 0: the base model's numbers
    pending_eval: bool = False  # an evaluation was cut short by a signal: run it again after the resume
    config: dict[str, Any] = field(default_factory=dict)  # the run's settings (public: no token)
    mixture_sha256: str | None = None  # a mixture file's contents (see mixture_digest)

    @classmethod
    def fresh(cls, cfg: Config) -> "RunState":
        return cls(config=cfg.public_dict(), mixture_sha256=mixture_digest(cfg.dataset_name))

    def to_dict(self) -> dict[str, Any]:
        """trainer_state.json's contents."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["bad"] = self.bad.state_dict()
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "RunState":
        """From trainer_state.json; keys older checkpoints lack take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names and k != "bad"})
        if saved.get("bad") is not None:
            state.bad.load_state_dict(saved["bad"])
        return state


# What a resume reads from trainer_state.json, and the types it needs: a state without them (`{}`, a list, a
# string step) would restart at step 0 over the good checkpoints or fail half-way through the resume.
REQUIRED = {"step": int}
OPTIONAL = {"best_metric": (int, float, type(None)), "best_step": (int, type(None)), "samples_seen": int,
            "audio_seconds_seen": (int, float), "nonfinite_in_row": int, "nonfinite_steps": int,
            "bad": (dict, type(None)), "base_metrics": (dict, type(None)), "pending_eval": bool,
            "config": dict, "mixture_sha256": (str, type(None))}


def state_problem(saved: object, step: int) -> str | None:
    """Why a checkpoint's trainer_state.json cannot be trusted for a resume at `step` (its folder's), or None."""
    if not isinstance(saved, dict):
        return f"holds a JSON {type(saved).__name__}, not a run state"
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if key not in saved:
            if key in REQUIRED:
                return f"has no {key!r}"
            continue
        value = saved[key]
        if isinstance(value, bool) and kind is not bool:  # JSON true is not a step count
            return f"{key} is {value!r}"
        if not isinstance(value, kind):
            return f"{key} is {value!r}, not a {kind.__name__ if isinstance(kind, type) else kind[0].__name__}"
    if saved["step"] != step:
        return f"says step {saved['step']}, but the folder is checkpoint-{step}"
    if saved["step"] < 0:
        return f"step is {saved['step']}"
    return None


def improves(value: float | None, best: float | None, greater_is_better: bool) -> bool:
    if value is None:
        return False
    return best is None or (value > best if greater_is_better else value < best)


def mixture_digest(dataset_name: str) -> str | None:
    """A mixture file's contents: editing it changes what is trained, though dataset_name stays the same."""
    path = Path(dataset_name)
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


# Settings that change what is being trained: resuming across a change would mix two runs.
IDENTITY = ("whisper_pretrained", "lang", "task", "dataset_name", "dataset_config", "train_split",
            "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
            # which weights are trained, and the optimizer's state format: a checkpoint of another mode cannot load
            "freeze_encoder", "lora_r", "lora_alpha", "lora_target_modules", "optim")


def resume_state(saved: dict[str, Any], cfg: Config, say) -> RunState:
    """The saved state to go on with; a checkpoint of another run is refused (RunStopped, exit CONFIG)."""
    before = saved.get("config", {})
    changed = [k for k in IDENTITY if k in before and before[k] != getattr(cfg, k)]
    if saved.get("mixture_sha256") != mixture_digest(cfg.dataset_name):
        changed.append("the sources listed in " + cfg.dataset_name)
    if changed:
        raise RunStopped("the checkpoints in " + cfg.checkpoint_dir + " belong to a different run: " +
                         "; ".join(f"{k} was {before[k]!r}, now {getattr(cfg, k)!r}" if k in IDENTITY else
                                   f"{k} changed" for k in changed) +
                         ". Set a new checkpoint_name (or checkpoint_dir) to start a fresh run.", Exit.CONFIG)
    noted = [k for k, v in before.items() if k not in IDENTITY and k in cfg.public_dict() and cfg.public_dict()[k] != v]
    if noted:
        say("resuming with changed settings: " + ", ".join(f"{k} {before[k]!r} -> {getattr(cfg, k)!r}" for k in noted))
    return RunState.from_dict({**saved, "config": cfg.public_dict()})
