"""Several named evaluation sets: each evaluated and logged at every evaluation, the first one choosing the
best model, all of them in the model card (base and fine-tuned)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import CV_AS, base_config, metrics, run_train
from whisper_ft.config import ConfigError, eval_set_specs, load_config

# A list keeps its order even through tools that sort mapping keys (the test harness's YAML dump does).
SETS = [{"name": "en_dev", "split": "dev"}, {"name": "as_dev", "dataset_name": str(CV_AS), "split": "dev"}]


def run_with(tiny_model, tmp_path, name, sets, **extra):
    """learning_rate 0.05 overshoots: the English dev loss keeps falling while the Assamese one (a language
    the run does not train) is lowest at step 2 and then rises, so the two sets disagree on the best step."""
    out = tmp_path / name
    cfg = base_config(tiny_model, out, max_steps=6, eval_steps=2, save_steps=2, eval_at_start=True,
                      eval_sets=sets, learning_rate=0.05, max_eval_samples=4, save_total_limit=0, **extra)
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def best_step(out):
    return json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["best_step"]


def argmin_after_start(evals, key):
    later = [r for r in evals if r["step"] > 0]
    return min(later, key=lambda r: r[key])["step"]


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sets")
    return (run_with(tiny_model, tmp, "en_first", SETS, predict_with_generate=True, generation_max_length=6,
                     report_to="tensorboard"),
            run_with(tiny_model, tmp, "as_first", SETS[::-1]))


def test_each_set_is_logged_at_every_evaluation(two_runs):
    (out, proc), _ = two_runs
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    for r in evals:
        assert r["eval/en_dev/samples"] == 4 and r["eval/as_dev/samples"] == 2
        for name in ("en_dev", "as_dev"):
            assert {f"eval/{name}/{k}" for k in ("wer", "cer", "wer_ortho", "loss", "bad_samples")} <= r.keys()
        # the plain keys are the first set's, so existing scripts keep reading the set that picks the model
        assert r["eval_loss"] == r["eval/en_dev/loss"] and r["eval_wer"] == r["eval/en_dev/wer"]
        assert r["eval/en_dev/loss"] != r["eval/as_dev/loss"]
    assert "en_dev: wer" in proc.stderr and "as_dev: wer" in proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "runs").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"eval/en_dev/wer", "eval/as_dev/wer", "eval/en_dev/loss", "eval/as_dev/loss", "eval/wer"} <= tags


def test_the_first_set_chooses_the_best_model(two_runs):
    (en_out, _), (as_out, _) = two_runs
    en_evals = [r for r in metrics(en_out) if "eval_loss" in r]
    as_evals = [r for r in metrics(as_out) if "eval_loss" in r]
    assert all(r["eval_loss"] == r["eval/as_dev/loss"] for r in as_evals)  # plain keys follow the order
    assert best_step(en_out) == argmin_after_start(en_evals, "eval/en_dev/loss")
    assert best_step(as_out) == argmin_after_start(as_evals, "eval/as_dev/loss")
    # the sets disagree, so following the first set is not a coincidence
    assert argmin_after_start(en_evals, "eval/as_dev/loss") != argmin_after_start(en_evals, "eval/en_dev/loss")
    assert best_step(en_out) != best_step(as_out)


def test_the_card_lists_every_set_base_and_fine_tuned(two_runs):
    (out, _), _ = two_runs
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    fine, base = meta["model-index"]
    assert [r["dataset"]["split"] for r in fine["results"]] == ["dev", "dev"]
    assert [r["dataset"]["name"] for r in fine["results"]] == ["cv-en", "cv-as"]
    evals = [r for r in metrics(out) if "eval_loss" in r]
    step = best_step(out)
    exported = [r for r in evals if r["step"] == step][-1]
    assert fine["results"][1]["metrics"][0]["value"] == round(exported["eval/as_dev/wer"], 2)
    assert base["results"][1]["metrics"][0]["value"] == round(evals[0]["eval/as_dev/wer"], 2)
    assert "| en_dev | `cv-en` `dev` | 4 |" in card and "| as_dev | `cv-as` `dev` | 2 |" in card


def test_the_evaluate_command_evaluates_every_set_as_training_did(two_runs, tmp_path, capsys):
    """python -m whisper_ft.cli.evaluate without --split: each set of eval_sets, each in its own folder, with
    the numbers the run logged for that checkpoint."""
    from whisper_ft.cli.evaluate import main

    (out, _), _ = two_runs
    assert main(["--config", str(out / "config.yaml"), "--model", str(out / "checkpoint-6"),
                 "--output-dir", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    logged = [r for r in metrics(out) if "eval_loss" in r and r["step"] == 6][-1]
    for name, samples in (("en_dev", 4), ("as_dev", 2)):
        summary = json.loads((tmp_path / "ev" / name / "summary.json").read_text())
        assert summary["eval_set"] == name and summary["metrics"]["eval_samples"] == samples
        assert summary["metrics"]["eval_wer"] == logged[f"eval/{name}/wer"]
        assert summary["metrics"]["eval_loss"] == pytest.approx(logged[f"eval/{name}/loss"], rel=1e-5)
        assert f"{name}: {samples} samples: wer" in err
    # --split still evaluates one split of the run's dataset, named by the split
    assert main(["--config", str(out / "config.yaml"), "--model", str(out / "checkpoint-6"), "--split", "test"]) == 0
    assert json.loads((out / "eval" / "checkpoint-6-test" / "summary.json").read_text())["dataset"].endswith("cv-en")


def test_eval_sets_from_yaml_and_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lang": "en", "dataset_name": "data.csv", "text_column": "text",
                                    "eval_sets": {"dev": {"split": "dev"}, "general": {"dataset_name": "ls.csv"}}}))
    cfg = load_config(["--config", str(path)], env={})
    specs = eval_set_specs(cfg)
    assert list(specs) == ["dev", "general"]
    assert specs["dev"] == {"dataset_name": "data.csv", "split": "dev", "dataset_config": "",
                            "dataset_revision": "", "text_column": "text", "audio_column": ""}
    # another dataset does not inherit this one's columns; a missing split is eval_split
    assert specs["general"]["text_column"] == "" and specs["general"]["split"] == "validation"
    cli = load_config(["--eval-sets", "{a: {split: test}, b: {dataset_name: google/fleurs}}"], env={})
    assert eval_set_specs(cli)["b"]["dataset_revision"] == "refs/convert/parquet"
    assert list(eval_set_specs(load_config([], env={}))) == ["eval"]  # default: one set from eval_split
    with pytest.raises(ConfigError) as e:
        load_config(["--eval-sets", "{x y: {}, b: {splt: dev}}", "--lang", "zz"], env={})
    assert "name 'x y'" in str(e.value) and "unknown keys splt" in str(e.value) and "zz" in str(e.value)
