import re
import subprocess
import sys

import pytest

from conftest import ROOT
from whisper_ft.config import Config, ConfigError, dump_yaml, field_docs, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return str(p)


@pytest.mark.slow
def test_yaml_then_cli_then_derived(tmp_path):
    path = write(tmp_path, "lang: hi\nlearning_rate: 1e-5\nmax_steps: 100\nfp16: false\n")
    cfg = load_config(["--config", path, "--learning-rate", "3e-5", "-t", "50", "--bf16"], env={})
    assert cfg.lang == "hi" and cfg.learning_rate == 3e-5 and cfg.max_steps == 50 and cfg.bf16 and not cfg.fp16
    assert cfg.whisper_pretrained == "openai/whisper-small"
    assert cfg.checkpoint_name == "whisper-small-hi"
    assert cfg.checkpoint_dir == "checkpoints/whisper-small-hi"


@pytest.mark.slow
def test_guide_short_flags_keep_their_meaning(tmp_path):
    cfg = load_config(["-g", "1", "-l", "as", "-dn", "x/y", "-dc", "/c", "-mn", "whisper-tiny", "-mc", "/m",
                       "-wp", "/w", "-ck", "run", "-cd", "/out", "-t", "7"], env={})
    assert (cfg.gpu_device, cfg.lang, cfg.dataset_name, cfg.dataset_cache, cfg.model_name, cfg.model_cache,
            cfg.whisper_pretrained, cfg.checkpoint_name, cfg.checkpoint_dir, cfg.max_steps) == \
        ("1", "as", "x/y", "/c", "whisper-tiny", "/m", "/w", "run", "/out", 7)


@pytest.mark.slow
def test_every_field_has_a_long_flag_and_a_comment():
    for name, default, comment in field_docs():
        assert comment, f"{name} has no one-line comment"
    flags = {"--" + n.replace("_", "-") for n, _, _ in field_docs()}
    help_text = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), "--help"], capture_output=True,
                               text=True).stdout
    assert all(f in help_text for f in flags)


def test_all_problems_reported_together(tmp_path):
    path = write(tmp_path, "learning_rat: 1e-5\nmax_steps: many\nfp16: true\nbf16: true\nlang: assamse\n"
                           "eval_strategy: no\nload_best_model_at_end: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(["--config", path, "--per-device-train-bach-size", "8"], env={})
    problems = err.value.problems
    text = str(err.value)
    assert "'learning_rat'" in text and "did you mean 'learning_rate'" in text
    assert "--per-device-train-bach-size" in text and "did you mean --per-device-train-batch-size" in text
    assert "max_steps must be a whole number, not 'many'" in text
    assert "fp16 and bf16 are both on" in text
    assert "close matches: assamese" in text
    assert "load_best_model_at_end needs evaluations" in text
    assert len(problems) == 6


@pytest.mark.parametrize("text,needle", [
    ("task: summarise\n", "task is 'summarise'"),
    ("per_device_train_batch_size: 0\n", "per_device_train_batch_size must be at least 1"),
    ("generation_max_length: 500\n", "exceeds Whisper's 448-token decoder"),
    ("model_name: whisper-small.en\nlang: as\n", "is English-only"),
    ("fp16: maybe\n", "fp16 must be true or false"),
    ("warmup_steps: 1.5\n", "warmup_steps must be a whole number"),
    ("- a\n- b\n", "must hold a mapping"),
    ("lang: [as\n", "is not valid YAML"),
    ("push_to_hub: true\n", "push_to_hub needs a Hub token"),
])
def test_each_error_kind(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_config(["--config", write(tmp_path, text)], env={"HF_HOME": str(tmp_path)})
    assert needle in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", "/nonexistent/c.yaml"], env={})


@pytest.mark.slow
def test_bad_config_exits_2_with_one_message_and_no_traceback(tmp_path):
    path = write(tmp_path, "max_stepz: 3\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train_loop.py"), "--config", path], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "unknown setting 'max_stepz'" in proc.stderr and "did you mean 'max_steps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_token_from_env_is_never_in_repr_or_dump(tmp_path):
    cfg = load_config([], env={"HF_TOKEN": "hf_SECRETSECRET"})
    assert cfg.hf_token == "hf_SECRETSECRET"
    assert "hf_SECRET" not in repr(cfg) and "hf_SECRET" not in dump_yaml(cfg)


def test_config_yaml_and_readme_document_every_field():
    """The shipped config.yaml sets every key, and the README's reference table lists each with its default."""
    shipped = load_config(["--config", str(ROOT / "config.yaml")], env={})
    assert isinstance(shipped, Config)
    config_text = (ROOT / "config.yaml").read_text()
    readme = (ROOT / "README.md").read_text()
    for name, default, comment in field_docs():
        assert re.search(rf"^{name}:", config_text, re.M), f"config.yaml lacks {name}"
        row = re.search(rf"^\| `{name}` \| `([^`]*)` \|", readme, re.M)
        assert row, f"README's config reference lacks {name}"
        assert row.group(1) == str(default), f"README default of {name} is {row.group(1)}, code says {default}"


# What names a run rather than tunes it: config.yaml sets these for its example run; every other key must be
# at Config's default, so that a short config of one's own trains exactly as the shipped one does.
IDENTITY_KEYS = {"lang", "task", "model_name", "whisper_pretrained", "model_cache", "dataset_name", "dataset_config",
                 "dataset_revision", "dataset_cache", "train_split", "eval_split", "text_column", "audio_column",
                 "checkpoint_name", "checkpoint_dir", "eval_sets", "hub_model_id", "hf_token", "gpu_device"}


def test_config_yaml_states_every_setting_at_its_default_with_its_help():
    import re
    from dataclasses import fields

    import yaml

    from whisper_ft.config import _coerce

    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    shipped = yaml.safe_load(text)
    defaults, helps = Config(), {f.name: f.metadata["help"] for f in fields(Config)}
    assert set(shipped) == set(helps), f"missing: {set(helps) - set(shipped)}, unknown: {set(shipped) - set(helps)}"
    differ = {k: (shipped[k], getattr(defaults, k)) for k in set(helps) - IDENTITY_KEYS
              if _coerce(k, shipped[k]) != getattr(defaults, k)}
    assert not differ, f"config.yaml and Config disagree (yaml, default): {differ}"
    comments = dict(re.findall(r"^([a-z_0-9]+): .*?  # (.*)$", text, flags=re.M))
    assert {k: comments.get(k) for k in helps if comments.get(k) != helps[k]} == {}, "config.yaml's comments differ"


def test_the_guides_fp16_alone_means_fp16_not_both(tmp_path):
    path = write(tmp_path, "fp16: true\n")
    cfg = load_config(["--config", str(path)], env={})
    assert cfg.fp16 and not cfg.bf16
    assert load_config(["--config", str(write(tmp_path, "max_steps: 5\n"))], env={}).bf16
    with pytest.raises(ConfigError, match="fp16 and bf16 are both on"):
        load_config(["--config", str(write(tmp_path, "fp16: true\nbf16: true\n"))], env={})
