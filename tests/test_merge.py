"""merge_base: the exported weights are theta_base + alpha (theta_fine-tuned - theta_base) at the alpha the stated
rule picks; exact at both ends, for LoRA too, after a resume and across processes."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from conftest import base_config, metrics, run_train, straight_and_resumed, torchrun
from whisper_ft import merge

# A domain set and a general-speech guard set, as in a real run: the base model is poor on the domain
# (36.8) and good on general speech (10.7); fine-tuning fixes the domain and forgets some general speech.
BASE = {"domain": 36.8, "general": 10.7}
TABLE = {0.1: {"domain": 20.0, "general": 10.0}, 0.2: {"domain": 9.0, "general": 8.0},
         0.3: {"domain": 0.0, "general": 5.4}, 0.4: {"domain": 0.0, "general": 5.4},
         0.5: {"domain": 0.0, "general": 5.4}, 0.7: {"domain": 0.0, "general": 7.7},
         1.0: {"domain": 0.0, "general": 14.3}}


def test_the_lowest_mean_wins_and_a_tie_goes_to_the_smaller_alpha():
    alpha, why = merge.choose(TABLE, BASE, "domain")
    assert alpha == 0.3  # 0.3, 0.4 and 0.5 tie at a mean of 2.7
    assert "excluded for the guard sets: 1" in why  # 14.3 is 3.6 points worse than the base's 10.7


def test_a_guard_set_excludes_an_alpha_whose_mean_is_best():
    table = {0.5: {"domain": 10.0, "general": 11.5}, 1.0: {"domain": 0.0, "general": 12.0}}
    assert merge.choose(table, BASE, "domain")[0] == 0.5  # 1.0's mean 6.0 is lower, but general +1.3 > 1.0
    assert merge.choose(table, BASE, "domain", max_increase=2.0)[0] == 1.0
    # the domain weighted 3: 0.5 -> (30 + 11.5) / 4 = 10.4, 1.0 -> 12 / 4 = 3.0, both within 2 points
    assert merge.choose(table, BASE, "domain", domain_weight=3.0, max_increase=2.0)[0] == 1.0


def test_when_every_alpha_breaks_a_guard_the_base_model_is_kept_and_said_so():
    table = {a: {"domain": 1.0, "general": 20.0} for a in (0.5, 1.0)}
    alpha, why = merge.choose(table, BASE, "domain")
    assert alpha == 0.0 and "base model is exported unchanged" in why


def test_one_set_alone_picks_its_best_and_asks_for_a_guard_set():
    alpha, why = merge.choose({a: {"domain": row["domain"]} for a, row in TABLE.items()}, {"domain": 36.8}, "domain")
    assert alpha == 0.3 and "add a guard set" in why


def test_a_metric_where_greater_is_better_is_maximised():
    table = {0.5: {"d": 80.0, "g": 90.0}, 1.0: {"d": 95.0, "g": 85.0}}
    base = {"d": 50.0, "g": 90.0}
    assert merge.choose(table, base, "d", greater_is_better=True)[0] == 0.5  # 1.0 loses 5 points on g
    assert merge.choose(table, base, "d", greater_is_better=True, max_increase=5.0)[0] == 1.0


def test_alpha_0_is_the_base_and_1_the_fine_tuned_weights_bit_for_bit(tiny_model):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    model.model.encoder.requires_grad_(False)  # a frozen encoder: only the trainable weights move
    ends = merge.Endpoints(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    with torch.no_grad():  # "fine-tuning"
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    for alpha, expect in ((0.0, base), (1.0, tuned)):
        ends.set_alpha(model, alpha)
        assert all(torch.equal(p, expect[n]) for n, p in model.named_parameters()), alpha
    ends.set_alpha(model, 0.3)
    for n, p in model.named_parameters():
        assert torch.allclose(p, base[n] + 0.3 * (tuned[n] - base[n]), rtol=1e-6, atol=1e-7), n


def test_lora_moves_its_update_by_exactly_alpha(tiny_model):
    """B·A scaled by alpha, not (interpolated A)·(interpolated B): peft's merged delta at alpha is alpha x delta."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    model = get_peft_model(WhisperForConditionalGeneration.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ends = merge.Endpoints(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # A moves from its random start, B from zero
    layers = [m for m in model.modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")]
    full = [m.get_delta_weight("default").clone() for m in layers]
    ends.set_alpha(model, 0.4)
    assert all(torch.allclose(m.get_delta_weight("default"), 0.4 * d, rtol=1e-5, atol=1e-8)
               for m, d in zip(layers, full))
    ends.set_alpha(model, 0.0)
    assert all(torch.equal(m.get_delta_weight("default"), torch.zeros_like(d)) for m, d in zip(layers, full))


def merge_config(model, out, **overrides):
    """Two evaluation sets, the domain's first; the loss picks (no generation: fast)."""
    return base_config(model, out, max_steps=4, eval_steps=2, save_steps=2, merge_base=True, eval_at_start=True,
                       eval_sets=[{"name": "dev", "split": "dev"}, {"name": "general", "split": "train"}],
                       **overrides)


def merge_row(out):
    rows = [r for r in metrics(out) if "merge_alpha" in r]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.slow
def test_the_export_is_the_chosen_alpha_and_the_table_is_kept(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = run_train(merge_config(tiny_model, out), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = merge_row(out)
    table = {r["alpha"]: {"dev": r["dev"], "general": r["general"]} for r in row["merge_table"]}
    assert sorted(table) == [0.0] + list(merge.ALPHAS)
    base = table.pop(0.0)
    assert row["merge_alpha"] == merge.choose(table, base, "dev")[0]
    assert row["eval/dev/loss"] == (table[row["merge_alpha"]]["dev"] if row["merge_alpha"] else base["dev"])
    start = load_file(tiny_model / "model.safetensors")
    best = [r["step"] for r in metrics(out) if "eval_loss" in r and "merge_alpha" not in r and r["step"] > 0]
    best_step = min(best, key=lambda s: next(r["eval_loss"] for r in metrics(out) if r["step"] == s and "eval_loss" in r))
    tuned = load_file(out / f"checkpoint-{best_step}" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    for name, value in exported.items():
        expect = torch.lerp(start[name].float(), tuned[name].float(), row["merge_alpha"])
        assert torch.equal(value, expect), name
    card = (out / "README.md").read_text()
    assert "Merged with the base model" in card and f"merged with the base at alpha {row['merge_alpha']:g}" in card
    assert "merge_base: exporting alpha" in proc.stderr
    before, after = base["dev"], row["eval/dev/loss"]
    assert f"loss: base model {before:.2f} -> fine-tuned {after:.2f} (merged with the base at alpha " \
           f"{row['merge_alpha']:g})" in proc.stderr  # the closing line gives the exported model's number


@pytest.mark.slow
def test_a_resumed_run_merges_and_exports_as_an_uninterrupted_one(tiny_model, tmp_path):
    straight, resumed, _, _ = straight_and_resumed(
        tiny_model, tmp_path, dict(max_steps=4, eval_steps=2, save_steps=2, merge_base=True, eval_at_start=True,
                                   eval_sets=[{"name": "dev", "split": "dev"}, {"name": "general", "split": "train"}]),
        (2, 4))
    assert merge_row(straight)["merge_table"] == merge_row(resumed)["merge_table"]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_lora_merges_the_same_in_two_processes_as_in_one(tiny_model, tmp_path):
    """2 processes x batch 2 see the samples 1 process x batch 2 x accumulation 2 does; sums in another order,
    so the losses agree to rel 1e-4 and the exports to that tolerance, at the same alpha."""
    cfg = dict(lora_r=4, per_device_train_batch_size=2, learning_rate=1e-2)
    two, one = tmp_path / "two", tmp_path / "one"
    proc = run_train(merge_config(tiny_model, two, **cfg), tmp_path,
                     launcher=torchrun(), env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc1 = run_train(merge_config(tiny_model, one, **cfg, gradient_accumulation_steps=2), tmp_path)
    assert proc1.returncode == 0, proc1.stderr[-3000:]
    r2, r1 = merge_row(two), merge_row(one)
    assert r2["merge_alpha"] == r1["merge_alpha"]
    for x, y in zip(r2["merge_table"], r1["merge_table"]):
        assert x["alpha"] == y["alpha"] and all(abs(x[s] - y[s]) <= 1e-4 * abs(y[s]) for s in ("dev", "general"))
    a, b = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_merge_base_is_on_by_default_and_says_where_it_cannot_run():
    from whisper_ft.config import Config

    cfg = Config()
    assert cfg.merge_base and merge.unavailable(cfg, sharded=False) == ""
    assert "FSDP" in merge.unavailable(cfg, sharded=True)
    cfg.eval_strategy = "no"
    assert "eval_strategy is no" in merge.unavailable(cfg, sharded=False)


@pytest.mark.slow
def test_without_evaluation_the_default_merge_is_skipped_with_a_warning_and_the_trained_weights_exported(
        tiny_model, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, out, max_steps=2, save_steps=2, eval_strategy="no", load_best_model_at_end=False)
    del cfg["merge_base"]  # the default
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merge_base is off for this run: it picks its alpha by evaluating, and eval_strategy is no" in proc.stderr
    assert not [r for r in metrics(out) if "merge_alpha" in r]
    exported, tuned = load_file(out / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert exported.keys() == tuned.keys() and all(torch.equal(exported[k], tuned[k]) for k in exported)
