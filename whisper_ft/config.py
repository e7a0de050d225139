"""Every setting of a run: one dataclass, its defaults, YAML < command line, derived defaults.

All problems found in a config are collected and raised together as one ConfigError, so a user
fixes their file in one go instead of one traceback at a time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import os
import re
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

MAX_TARGET_POSITIONS = 448  # Whisper's decoder length, prefix tokens included (DESIGN: label length)
METRICS = ("wer", "cer", "wer_ortho", "loss")  # what metric_for_best_model may name
# What one entry of eval_sets may say; each missing key falls back to the run's own setting
# (split to eval_split, the others to the key of the same name).
EVAL_SET_KEYS = ("dataset_name", "split", "dataset_config", "dataset_revision", "text_column", "audio_column")


class ConfigError(Exception):
    """One or more problems with the configuration; str() lists each on its own line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))


def setting(default: Any, help: str) -> Any:
    """A Config field with its help text: the one source for --help, field_docs() and the README table.

    A mutable default (eval_sets' {}) is copied for each Config, as dataclasses' default_factory does.
    """
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- what to fine-tune -------------------------------------------------------------------
    lang: str = setting("as", "language of the speech: ISO 639-1/2/3 code, Whisper name or Common Voice locale")
    task: str = setting("transcribe", "transcribe (speech -> same-language text) or translate (-> English)")
    model_name: str = setting("whisper-small", "Whisper size; names the run and derives whisper_pretrained")
    whisper_pretrained: str = setting("", "Hub id or local folder of the starting model; default openai/<model_name>")
    model_cache: str = setting("", "where Hub models are cached; empty = the Hugging Face default cache")
    # --- data --------------------------------------------------------------------------------
    dataset_name: str = setting("google/fleurs", "Hub id, Common Voice folder, CSV/TSV/JSONL manifest, audiofolder, or .yaml mixture")
    dataset_config: str = setting("", "Hub dataset config (subset); empty = derived from lang for known datasets")
    dataset_revision: str = setting("", "Hub dataset revision; empty = refs/convert/parquet (the script-free copy) for google/fleurs")
    dataset_cache: str = setting("", "where Hub datasets are cached; empty = the Hugging Face default cache")
    train_split: str = setting("train", 'split(s) to train on; "train+dev" joins splits')
    eval_split: str = setting("validation", 'split(s) to evaluate on ("dev" and "validation" are synonyms)')
    text_column: str = setting("", "transcript column; empty = first of sentence/text/transcription/raw_transcription")
    audio_column: str = setting("", "audio column; empty = first of audio/path/file")
    streaming: bool = setting(False, "stream a Hub dataset instead of downloading it whole")
    max_train_samples: int = setting(0, "use at most this many training samples (0 = all); for quick trials")
    max_eval_samples: int = setting(0, "evaluate on at most this many samples (0 = all)")
    timestamp_probability: float = setting(0.2, "share of training samples trained with timestamps (keeps long-form working); 0 = none")
    max_bad_sample_fraction: float = setting(0.05, "stop when the unusable share is surely (99.99%, binomial test) above this")
    # --- output ------------------------------------------------------------------------------
    checkpoint_name: str = setting("", "run name; default <model_name>-<lang>")
    checkpoint_dir: str = setting("", "where checkpoints, logs and the final model go; default ./checkpoints/<checkpoint_name>")
    # --- optimisation ------------------------------------------------------------------------
    per_device_train_batch_size: int = setting(32, "samples per GPU per micro-batch; 16 with gradient_checkpointing on cards under 40 GB")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    learning_rate: float = setting(1e-5, "peak learning rate, reached after warmup_steps")
    lr_scheduler_type: str = setting("linear", "linear (warmup then decay to 0), constant_with_warmup, cosine")
    warmup_steps: int = setting(500, "optimizer steps of linear warmup from 0")
    max_steps: int = setting(4000, "optimizer steps to train in total")
    stop_at_step: int = setting(0, "save and exit after this step, schedule unchanged (time-limited jobs); 0 = off")
    weight_decay: float = setting(0.0, "AdamW decay, never applied to biases and LayerNorm")
    max_grad_norm: float = setting(1.0, "clip gradients to this norm (0 = no clipping)")
    seed: int = setting(42, "seeds data order, dropout and initialisation")
    gradient_checkpointing: str = setting("false", "recompute activations in backward: false (fastest), encoder (its 1500 frames hold most of the memory), true (all layers); encoder or true on cards under 40 GB")
    fp16: bool = setting(False, "float16 mixed precision, for cards without bf16 (V100, T4); fp16: true alone turns bf16 off")
    bf16: bool = setting(True, "bfloat16 mixed precision (Ampere or newer; fp16 with a warning on older cards; fp32 on the CPU)")
    dataloader_num_workers: int = setting(4, "processes decoding audio and computing log-mel features")
    torch_compile: str = setting("auto", "compile the model's forward (training) and decoder step (generation): auto = on with CUDA, true, false")
    max_nonfinite_steps: int = setting(10, "stop after this many optimizer steps in a row with a NaN/inf loss or gradient norm")
    optim: str = setting("adamw_torch", "adamw_torch, or adamw_8bit (bitsandbytes, CUDA only): 1/4 of the optimizer memory")
    # --- large models on small GPUs ----------------------------------------------------------
    freeze_encoder: bool = setting(False, "train the decoder only; with LoRA: adapters in the decoder only")
    lora_r: int = setting(0, "LoRA rank; 0 = off (full fine-tune). 8-32 trains 1-5% of the weights")
    lora_alpha: float = setting(0.0, "LoRA scale numerator (updates scaled by lora_alpha / lora_r); 0 = 2 x lora_r")
    lora_dropout: float = setting(0.0, "dropout on each adapter's input; 0 = none (fastest), 0.05-0.1 regularises tiny data sets")
    lora_target_modules: str = setting("q_proj,k_proj,v_proj,out_proj,fc1,fc2", "Linear layers given adapters (list or comma-separated)")
    lora_save_adapter: bool = setting(False, "also save the LoRA adapter alone in <checkpoint_dir>/adapter (peft format)")
    apply_spec_augment: bool = setting(False, "SpecAugment: mask random time steps / mel bins of the input in training")
    mask_time_prob: float = setting(0.05, "SpecAugment: share of time steps masked (in spans of mask_time_length)")
    mask_time_length: int = setting(10, "SpecAugment: frames per time mask (10 ms each)")
    mask_feature_prob: float = setting(0.0, "SpecAugment: share of mel bins masked (in spans of mask_feature_length)")
    mask_feature_length: int = setting(10, "SpecAugment: mel bins per feature mask")
    # --- keeping what the base model knew ----------------------------------------------------
    merge_base: bool = setting(True, "at the end, average the weights with the base model's at the alpha that evaluates best (WiSE-FT)")
    merge_domain_weight: float = setting(1.0, "merge_base: weight of the first evaluation set (the domain's) in the mean over the sets")
    merge_max_wer_increase: float = setting(1.0, "merge_base: how much worse than the base model every other evaluation set may get (points)")
    replay_dataset: str = setting("", "general speech mixed into training (same forms as dataset_name); empty = none")
    replay_split: str = setting("train", "replay_dataset's split to draw from")
    replay_fraction: float = setting(0.0, "share of each epoch's training samples drawn from replay_dataset (0 to 0.9)")
    # --- evaluation --------------------------------------------------------------------------
    eval_strategy: str = setting("steps", "steps (every eval_steps) or no")
    eval_steps: int = setting(1000, "evaluate every this many optimizer steps")
    eval_at_start: bool = setting(True, "evaluate the base model at step 0, so the improvement is known")
    per_device_eval_batch_size: int = setting(32, "samples per GPU per generate() call")
    predict_with_generate: bool = setting(True, "WER/CER from generate(); off = eval loss only")
    generation_max_length: int = setting(225, "max new tokens of a prediction (+ 3-4 prefix tokens, 448 in all at most)")
    eval_sets: dict = setting({}, "named evaluation sets {name: {dataset_name, split, ...}}; the first picks the best model; empty = eval_split")
    # --- checkpoints and logging -------------------------------------------------------------
    save_steps: int = setting(1000, "save a checkpoint every this many optimizer steps")
    save_total_limit: int = setting(3, "keep at most this many checkpoints (the best is always kept; 0 = all)")
    logging_steps: int = setting(25, "log loss and lr every this many optimizer steps")
    report_to: str = setting("tensorboard", "trackers: tensorboard, wandb, mlflow, ... (list or comma-separated) or none")
    load_best_model_at_end: bool = setting(True, "export the best checkpoint by metric_for_best_model, not the last")
    metric_for_best_model: str = setting("wer", "wer, cer, wer_ortho or loss")
    greater_is_better: bool = setting(False, "whether a larger metric_for_best_model is better")
    # --- Hub ---------------------------------------------------------------------------------
    push_to_hub: bool = setting(False, "upload the final model folder (and nothing else) at the end")
    hub_model_id: str = setting("", "Hub repo to upload to; default <your user>/<checkpoint_name>")
    hub_private: bool = setting(False, "create the Hub repo as private")
    hf_token: str = setting("", "Hub token; default $HF_TOKEN or the `hf auth login` cache. Never logged or saved")
    gpu_device: str = setting("", "GPU id(s) to train on, or cpu; empty = CUDA if present (accelerate launch: --gpu_ids)")

    def __repr__(self) -> str:  # the token must never reach a log line
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self.public_dict().items())})"

    def public_dict(self) -> dict[str, Any]:
        """Every setting except the Hub token: what is safe to log, save and compare on resume."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "hf_token"}


# The original guide's flags keep their meaning: its short forms, and its long forms where they differ from ours.
SHORT_FLAGS = {"gpu_device": "-g", "lang": "-l", "dataset_name": "-dn", "dataset_cache": "-dc", "model_name": "-mn",
               "model_cache": "-mc", "whisper_pretrained": "-wp", "checkpoint_name": "-ck", "checkpoint_dir": "-cd",
               "max_steps": "-t"}
GUIDE_LONG_FLAGS = {"gpu_device": "--gpu", "dataset_name": "--name", "dataset_cache": "--cache"}
DEFAULT_CONFIG = "config.yaml"  # read when --config is not given and it exists (the guide's default)
# accelerate's tracker names (Accelerator(log_with=...)) -> the package each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
PLACEHOLDER_TOKEN = re.compile(r"^<.*>$|^(your|my)[_-]?(hf[_-]?)?token$|^hf_x+$|^xxx+$", re.I)  # the guide's <your_hf_token>
CHOICES = {"task": ("transcribe", "translate"), "eval_strategy": ("steps", "no"),
           "lr_scheduler_type": ("linear", "constant_with_warmup", "cosine"),
           "metric_for_best_model": METRICS, "optim": ("adamw_torch", "adamw_8bit")}
COMMA_LISTS = ("lora_target_modules",)  # str fields that also take a YAML list, stored comma-separated
POSITIVE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "max_steps",
            "eval_steps", "save_steps", "logging_steps", "generation_max_length", "max_nonfinite_steps",
            "mask_time_length", "mask_feature_length")
NON_NEGATIVE = ("stop_at_step", "warmup_steps", "weight_decay", "max_grad_norm", "max_train_samples", "max_eval_samples",
                "save_total_limit", "dataloader_num_workers", "learning_rate", "lora_r", "lora_alpha")
# The real types (this module's annotations are strings under `from __future__ import annotations`).
FIELD_TYPES = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}
# Settings that were booleans and grew a third value: `true`/`false` (YAML, --x/--no-x) keep working.
TRI_STATE = {"gradient_checkpointing": ("true", "false", "encoder"), "torch_compile": ("auto", "true", "false")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune Whisper. Settings come from --config and are overridden by flags.",
                                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("--config", default=None,
                   help=f"YAML file with settings (see config.yaml); default ./{DEFAULT_CONFIG} when it exists")
    for f in fields(Config):
        flags = [SHORT_FLAGS[f.name]] if f.name in SHORT_FLAGS else []
        flags += [GUIDE_LONG_FLAGS[f.name]] if f.name in GUIDE_LONG_FLAGS else []
        flags.append("--" + f.name.replace("_", "-"))
        comment = f.metadata["help"].replace("%", "%%")  # argparse reads % as a format
        if f.name in TRI_STATE:  # --x means true, --no-x false, --x VALUE any of its values
            p.add_argument(*flags, dest=f.name, nargs="?", const="true", metavar="|".join(TRI_STATE[f.name]),
                           help=comment)
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const="false",
                           help=argparse.SUPPRESS)
        elif FIELD_TYPES[f.name] is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=comment)
        elif f.name == "report_to":  # --report-to tensorboard wandb, or --report-to tensorboard,wandb
            p.add_argument(*flags, dest=f.name, nargs="+", metavar="TRACKER", help=comment)
        else:
            p.add_argument(*flags, dest=f.name, metavar=f.name.upper(), help=comment)
    return p


def load_config(argv: list[str] | None = None, env: dict[str, str] | None = None, training: bool = False) -> Config:
    """YAML file < command line < derived defaults; raises ConfigError listing every problem.

    training: also check that this machine can run the training settings (CUDA and bitsandbytes for
    adamw_8bit, peft for LoRA, no LoRA under FSDP/ZeRO-3); evaluate and transcribe read the same config
    elsewhere and need none of that.
    """
    env = os.environ if env is None else env
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    problems = [_unknown_flag(u) if u.startswith("-") else f"unexpected argument {u!r}"
                for i, u in enumerate(unknown)
                if u.startswith("-") or i == 0 or not unknown[i - 1].startswith("-")]  # skip an unknown flag's value
    cli = {k: v for k, v in vars(args).items() if k != "config"}

    values: dict[str, Any] = {}
    config_path = args.config
    if config_path is None and Path(DEFAULT_CONFIG).is_file():  # the guide: --config defaults to config.yaml
        config_path = DEFAULT_CONFIG
        print(f"whisper-ft: no --config given; reading ./{DEFAULT_CONFIG}", file=sys.stderr, flush=True)
    if config_path is not None:
        values, yaml_problems = _read_yaml(config_path)
        problems += yaml_problems
    values.update(cli)

    cfg = Config()
    for key, raw in values.items():
        try:
            setattr(cfg, key, _coerce(key, raw))
        except ValueError as e:
            problems.append(str(e))
    if cfg.fp16 and "fp16" in values and "bf16" not in values:  # fp16: true alone (the guide's) means fp16, not both
        cfg.bf16 = False
    if PLACEHOLDER_TOKEN.match(cfg.hf_token.strip()):  # the guide's `hf_token: <your_hf_token>`, never a real one
        if cfg.push_to_hub:
            problems.append(f"hf_token is still the placeholder {cfg.hf_token!r}: put your Hugging Face write token "
                            "there (or set HF_TOKEN / run `hf auth login` and delete the line), or set push_to_hub: false")
        cfg.hf_token = ""  # not sent anywhere; $HF_TOKEN or the login cache are used instead
    _derive(cfg, env)
    problems += [p for p in validate(cfg) if not (p.startswith("push_to_hub needs") and any(
        "placeholder" in q for q in problems))]
    if training:
        from whisper_ft.sharding import launch_problems
        problems += environment_problems(cfg, env)
        problems += launch_problems(cfg, env)  # FSDP/DeepSpeed, as chosen by `accelerate launch`
        if cfg.learning_rate == 0:  # trains nothing, yet would export a "fine-tuned" model
            problems.append("learning_rate is 0: the weights would never change; give a positive learning_rate "
                            "(e.g. 1e-5)")
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: str) -> tuple[dict[str, Any], list[str]]:
    if not Path(path).is_file():
        return {}, [f"config file {path!r} does not exist"]
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        twice = _duplicate_keys(text)
    except yaml.YAMLError as e:
        return {}, [f"{path} is not valid YAML: {e}"]
    if twice:  # YAML would silently keep the last: which one the user meant is theirs to say
        return {}, [f"{path}: {key} is set twice (lines {a} and {b}); keep one" for key, a, b in twice]
    if data is None:  # an empty file given on purpose is a mistake (wrong file, failed copy), not "all defaults"
        return {}, [f"config file {path} is empty; give settings in it, or leave out --config to use the defaults"]
    if not isinstance(data, dict):
        return {}, [f"{path} must hold a mapping of setting: value, not {type(data).__name__}"]
    problems = [_unknown_key(k, path) for k in data if k not in FIELD_TYPES]
    return {k: v for k, v in data.items() if k in FIELD_TYPES}, problems


def _duplicate_keys(text: str) -> list[tuple[str, int, int]]:
    """(key, first line, repeated line) of every key given twice in one mapping of a YAML text."""
    found = []

    def walk(node) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name in seen:
                    found.append((name, seen[name], key.start_mark.line + 1))
                elif name is not None:
                    seen[name] = key.start_mark.line + 1
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    walk(yaml.compose(text, Loader=yaml.SafeLoader))
    return found


def _coerce(key: str, raw: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise a ValueError naming the key."""
    kind = FIELD_TYPES[key]
    if raw is None:
        return getattr(Config(), key) if kind is not str or key in TRI_STATE or key == "report_to" else ""
    if key in TRI_STATE:
        value = {"yes": "true", "1": "true", "no": "false", "0": "false"}.get(str(raw).lower(), str(raw).lower())
        if isinstance(raw, bool):
            value = "true" if raw else "false"
        if value not in TRI_STATE[key]:
            raise ValueError(f"{key} must be one of {', '.join(TRI_STATE[key])} (or true/false), not {raw!r}")
        return value
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "yes", "1", "false", "no", "0"):
            return raw.lower() in ("true", "yes", "1")
        raise ValueError(f"{key} must be true or false, not {raw!r}")
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(f"{key} must be a whole number, not {raw!r}")
        try:
            return int(raw) if not isinstance(raw, str) else int(raw.strip())
        except ValueError:
            raise ValueError(f"{key} must be a whole number, not {raw!r}") from None
    if kind is float:
        if isinstance(raw, bool):
            raise ValueError(f"{key} must be a number, not {raw!r}")
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string: accept it
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, not {raw!r}") from None
    if kind is dict:
        return _eval_sets(key, raw)
    if isinstance(raw, bool):  # YAML 1.1 reads `no` (eval_strategy: no, lang: no for Norwegian) as false
        return "no" if raw is False else "yes"
    if key == "report_to":  # a list (the guide's YAML) or a comma-separated string
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        if not all(isinstance(i, str) for i in items):
            raise ValueError(f"report_to must be tracker names, not {raw!r}")
        return ",".join(i.strip().lower() for i in items if i.strip()) or "none"
    if isinstance(raw, list) and key in COMMA_LISTS and all(isinstance(x, str) for x in raw):
        return ",".join(x.strip() for x in raw)
    if isinstance(raw, (dict, list)):
        raise ValueError(f"{key} must be a single value, not {type(raw).__name__}")
    return str(raw)


def _eval_sets(key: str, raw: Any) -> dict[str, dict[str, str]]:
    """eval_sets from YAML or the command line (the same written as YAML), in either shape:
    a mapping {name: {dataset_name, split, ...}}, or a list [{name: ..., dataset_name: ..., split: ...}]
    whose order cannot be lost by a tool that sorts mapping keys (the first set picks the best model).
    e.g. --eval-sets '[{name: dev, split: dev}, {name: general, dataset_name: other.csv, split: test}]'"""
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw) if raw.strip() else {}
        except yaml.YAMLError:
            raise ValueError(f"{key} is not valid YAML: {raw!r}") from None
    if isinstance(raw, list) and all(isinstance(item, dict) and "name" in item for item in raw):
        raw = {item["name"]: {k: v for k, v in item.items() if k != "name"} for item in raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{key} must be a mapping of name: {{dataset_name, split, ...}} or a list of "
                         f"{{name, dataset_name, split, ...}}, not {raw!r}")
    sets, problems = {}, []
    for name, spec in raw.items():
        spec = {} if spec is None else spec
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            problems.append(f"name {name!r} (use letters, digits, _ . -)")
        elif not isinstance(spec, dict):
            problems.append(f"{name}: must be a mapping with keys {', '.join(EVAL_SET_KEYS)}, not {spec!r}")
        elif [k for k in spec if k not in EVAL_SET_KEYS]:
            problems.append(f"{name}: unknown keys {', '.join(str(k) for k in spec if k not in EVAL_SET_KEYS)}"
                            f" (allowed: {', '.join(EVAL_SET_KEYS)})")
        else:
            sets[name] = {k: "" if v is None else str(v) for k, v in spec.items()}
    if problems:
        raise ValueError(f"{key}: " + "; ".join(problems))
    return sets


def eval_set_specs(cfg: Config) -> dict[str, dict[str, str]]:
    """Every evaluation set with each key filled in: one named "eval" by default.

    A set on the run's own dataset takes the run's config, revision and columns unless it names its own;
    a set on another dataset starts from the automatic defaults (detected columns, derived config).
    """
    out = {}
    for name, spec in (cfg.eval_sets or {"eval": {}}).items():
        dataset = spec.get("dataset_name") or cfg.dataset_name
        same = dataset == cfg.dataset_name
        filled = {"dataset_name": dataset, "split": spec.get("split") or cfg.eval_split,
                  **{k: spec.get(k) or (getattr(cfg, k) if same else "") for k in EVAL_SET_KEYS[2:]}}
        if not filled["dataset_revision"] and dataset == "google/fleurs":  # as _derive does for dataset_name
            filled["dataset_revision"] = "refs/convert/parquet"
        out[name] = filled
    return out


def _derive(cfg: Config, env: dict[str, str]) -> None:
    if not cfg.whisper_pretrained:
        cfg.whisper_pretrained = f"openai/{cfg.model_name}"
    if not cfg.checkpoint_name:
        cfg.checkpoint_name = f"{cfg.model_name}-{cfg.lang}"
    if not cfg.checkpoint_dir:
        cfg.checkpoint_dir = str(Path("checkpoints") / cfg.checkpoint_name)
    if not cfg.dataset_revision and cfg.dataset_name == "google/fleurs":  # its loading script no longer loads
        cfg.dataset_revision = "refs/convert/parquet"
    if not cfg.hf_token:
        cfg.hf_token = env.get("HF_TOKEN", "") or _cached_token()


def _cached_token() -> str:
    try:
        from huggingface_hub import get_token
        return get_token() or ""
    except Exception:  # an unreadable token cache must not stop an offline run
        return ""


def validate(cfg: Config) -> list[str]:
    from whisper_ft.languages import LanguageError, resolve

    problems = []
    for key, options in CHOICES.items():
        if getattr(cfg, key) not in options:
            problems.append(f"{key} is {getattr(cfg, key)!r}; choose one of: {', '.join(options)}")
    problems += [f"{k} must be at least 1, not {getattr(cfg, k)}" for k in POSITIVE if getattr(cfg, k) < 1]
    problems += [f"{k} must not be negative, not {getattr(cfg, k)}" for k in NON_NEGATIVE if getattr(cfg, k) < 0]
    problems += _report_to_problems(cfg.report_to)
    if cfg.gpu_device and cfg.gpu_device.strip().lower() != "cpu" and not re.fullmatch(r"\d+(,\d+)*",
                                                                                       cfg.gpu_device.replace(" ", "")):
        problems.append(f"gpu_device is {cfg.gpu_device!r}; give GPU ids (0, or 0,1), cpu, or leave it empty")
    if Path(cfg.checkpoint_dir).exists() and not Path(cfg.checkpoint_dir).is_dir():
        problems.append(f"checkpoint_dir {cfg.checkpoint_dir} is a file, not a folder; choose another checkpoint_dir "
                        "(or checkpoint_name)")
    if not 0 <= cfg.timestamp_probability <= 1:
        problems.append(f"timestamp_probability must be between 0 and 1, not {cfg.timestamp_probability}")
    if not 0 <= cfg.max_bad_sample_fraction <= 1:
        problems.append(f"max_bad_sample_fraction must be between 0 and 1, not {cfg.max_bad_sample_fraction}")
    if cfg.merge_domain_weight <= 0:
        problems.append(f"merge_domain_weight must be above 0, not {cfg.merge_domain_weight}")
    if cfg.merge_max_wer_increase < 0:
        problems.append(f"merge_max_wer_increase must be 0 or more, not {cfg.merge_max_wer_increase}")
    if not 0 <= cfg.replay_fraction <= 0.9:
        problems.append(f"replay_fraction must be between 0 and 0.9, not {cfg.replay_fraction}")
    if bool(cfg.replay_dataset) != (cfg.replay_fraction > 0):
        problems.append("replay_dataset and replay_fraction go together: set both (e.g. replay_fraction: 0.2) or neither")
    if cfg.replay_dataset and cfg.streaming:
        problems.append("replay_dataset works with downloaded datasets, not with streaming: true")
    if cfg.fp16 and cfg.bf16:
        problems.append("fp16 and bf16 are both on; choose one (e.g. --no-fp16 --bf16)")
    if cfg.generation_max_length > MAX_TARGET_POSITIONS:
        problems.append(f"generation_max_length {cfg.generation_max_length} exceeds Whisper's {MAX_TARGET_POSITIONS}-token decoder")
    if cfg.load_best_model_at_end and cfg.eval_strategy == "no":
        problems.append("load_best_model_at_end needs evaluations: set eval_strategy: steps or load_best_model_at_end: false")
    if cfg.metric_for_best_model != "loss" and not cfg.predict_with_generate and cfg.eval_strategy != "no":
        problems.append(f"metric_for_best_model {cfg.metric_for_best_model} needs predict_with_generate: true (or use loss)")
    problems += _training_mode_problems(cfg)
    if cfg.push_to_hub and not cfg.hf_token:
        problems.append("push_to_hub needs a Hub token: set HF_TOKEN, run `hf auth login`, or set hf_token")
    try:
        lang = resolve(cfg.lang)
        if cfg.task == "translate" and lang.code == "en":
            problems.append("task translate turns speech into English; with lang en use task transcribe")
        if cfg.model_name.endswith(".en") and lang.code != "en":
            problems.append(f"{cfg.model_name} is English-only; it cannot learn {lang.name}. Use a multilingual size "
                            f"(e.g. {cfg.model_name[:-3]}) or lang en")
    except LanguageError as e:
        problems.append(str(e))
    return problems


def _report_to_problems(report_to: str) -> list[str]:
    """Every tracker named must be one accelerate knows and its package importable, checked before any work."""
    import importlib.util

    names = report_to.split(",")
    if "none" in names:
        return [] if names == ["none"] else [f"report_to {report_to!r}: none turns logging off; do not combine it"]
    problems = []
    for name in names:
        if name not in TRACKERS:
            problems.append(f"report_to {name!r} is not a tracker; choose from: none, {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(TRACKERS[name]) is None and not (
                name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            problems.append(f"report_to {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]} "
                            f"(or remove {name} from report_to)")
    return problems


def trackers(cfg: Config) -> list[str]:
    """The trackers to pass to Accelerator(log_with=...); empty when report_to is none."""
    return [] if cfg.report_to == "none" else cfg.report_to.split(",")


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but probably not meant: reported before the run starts, not refused."""
    notes = []
    if cfg.warmup_steps >= cfg.max_steps:
        notes.append(f"warmup_steps {cfg.warmup_steps} >= max_steps {cfg.max_steps}: the learning rate never reaches "
                     f"learning_rate {cfg.learning_rate:g}; lower warmup_steps (e.g. to {max(0, cfg.max_steps // 10)})")
    from whisper_ft.languages import LanguageError, resolve

    try:
        lang = resolve(cfg.lang)
    except LanguageError:  # refused by validation, which names it
        lang = None
    if lang is not None and not lang.uses_spaces and cfg.metric_for_best_model in ("wer", "wer_ortho"):
        notes.append(f"{lang.name} is written without spaces between words, so its word error rate counts a whole "
                     f"sentence as one word; metric_for_best_model: cer picks the best model by character error rate "
                     f"(what the Whisper paper reports for {lang.name})")
    return notes


def _training_mode_problems(cfg: Config) -> list[str]:
    """The LoRA and SpecAugment values themselves."""
    import re

    problems = []
    for key in ("lora_dropout", "mask_time_prob", "mask_feature_prob"):
        if not 0 <= getattr(cfg, key) <= 1:
            problems.append(f"{key} must be between 0 and 1, not {getattr(cfg, key)}")
    if cfg.lora_r > 0:
        names = [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]
        if not names:
            problems.append("lora_target_modules is empty; name the Linear layers to adapt, "
                            "e.g. q_proj,k_proj,v_proj,out_proj,fc1,fc2")
        problems += [f"lora_target_modules: {m!r} is not a module name" for m in names if not re.fullmatch(r"[\w.]+", m)]
    return problems


def environment_problems(cfg: Config, env) -> list[str]:
    """Training settings this machine or launch cannot run: refused before anything is loaded."""
    problems = []
    if cfg.lora_r > 0:
        if not _installed("peft"):
            problems.append("lora_r > 0 needs peft: pip install peft (it is in requirements.txt)")
        # The adapter is merged into the whole model at the end and its checkpoints are written by our
        # save hook; under FSDP or ZeRO-3 the weights are sharded across processes and neither holds.
        from whisper_ft.sharding import launch_zero_stage

        if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" or (
                env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and launch_zero_stage(env) == 3):
            problems.append("LoRA (lora_r > 0) is not supported with FSDP or DeepSpeed ZeRO-3, which shard the weights; "
                            "a LoRA run fits one GPU: launch it with DDP (accelerate_configs/ for one or several GPUs) "
                            "or DeepSpeed ZeRO-2")
    if cfg.optim == "adamw_8bit":
        missing = []
        if env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") or not _cuda_available():
            missing.append("a CUDA GPU (bitsandbytes' 8-bit optimizers do not run on CPU)")
        if not _installed("bitsandbytes"):
            missing.append("bitsandbytes (pip install bitsandbytes; it is optional and not in requirements.txt)")
        if missing:
            problems.append("optim adamw_8bit needs " + " and ".join(missing) + "; or use optim: adamw_torch")
    return problems


def _installed(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: blocked with sys.modules[package] = None
        return False


def _cuda_available() -> bool:
    import torch  # only imported when adamw_8bit is asked for: loading a config stays light

    return torch.cuda.is_available()


def _unknown_key(key: str, where: str) -> str:
    close = difflib.get_close_matches(str(key), FIELD_TYPES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown setting {key!r} in {where}{hint}"


def _unknown_flag(flag: str) -> str:
    name = flag.split("=", 1)[0]
    options = ["--" + k.replace("_", "-") for k in FIELD_TYPES] + ["--config"] + list(GUIDE_LONG_FLAGS.values())
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown option {name}{hint}"


def field_docs() -> list[tuple[str, Any, str]]:
    """(name, default, help) for every setting, in declaration order."""
    return [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory(), f.metadata["help"])
            for f in fields(Config)]


def dump_yaml(cfg: Config) -> str:
    """The resolved config without the token, as saved beside checkpoints."""
    return yaml.safe_dump(cfg.public_dict(), sort_keys=False, allow_unicode=True)
