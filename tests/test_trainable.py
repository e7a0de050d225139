"""Large Whisper on a small GPU: LoRA, a frozen encoder, SpecAugment, the large-v3 layout, and the
settings refused up front (whisper_ft/trainable.py, config.environment_problems)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CV_AS, CV_EN, ROOT, base_config, metrics, run_train, straight_and_resumed, train_rows
from whisper_ft.config import Config, ConfigError, _installed, load_config


# ---- config: refused up front, all problems in one message ------------------------------------------


def test_incompatible_training_settings_are_refused_together(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: adamw_8bit\nlora_r: 8\nlora_dropout: 1.5\nmask_time_prob: -0.1\nmask_feature_prob: 2\n"
                    "lora_target_modules: []\nlora_alpha: -1\n", encoding="utf-8")
    env = {"ACCELERATE_USE_FSDP": "true"}
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(path)], env=env, training=True)
    text = str(err.value)
    no_8bit = not torch.cuda.is_available() or not _installed("bitsandbytes")
    if not torch.cuda.is_available():
        assert "optim adamw_8bit needs a CUDA GPU" in text
    if not _installed("bitsandbytes"):
        assert "pip install bitsandbytes" in text
    assert "LoRA (lora_r > 0) is not supported with FSDP or DeepSpeed ZeRO-3" in text
    assert "lora_dropout must be between 0 and 1, not 1.5" in text
    assert "mask_time_prob must be between 0 and 1, not -0.1" in text
    assert "mask_feature_prob must be between 0 and 1, not 2.0" in text
    assert "lora_target_modules is empty" in text
    assert "lora_alpha must not be negative" in text
    # the FSDP launch itself (tests/test_distributed.py): it needs CUDA, and generation on sharded weights is refused
    assert "predict_with_generate is not supported with FSDP" in text
    assert ("FSDP needs CUDA GPUs" in text) == (not torch.cuda.is_available())
    assert len(err.value.problems) == 6 + no_8bit + 1 + (not torch.cuda.is_available())
    # Evaluation reads the same config and needs neither a GPU nor peft: only the value checks apply.
    path.write_text("optim: adamw_8bit\nlora_r: 8\n", encoding="utf-8")
    assert load_config(["--config", str(path)], env=env).optim == "adamw_8bit"
    # DeepSpeed ZeRO-3 as accelerate launch announces it; ZeRO-2 is fine
    zero = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    path.write_text("lora_r: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not supported with FSDP or DeepSpeed ZeRO-3"):
        load_config(["--config", str(path)], env=zero, training=True)
    # ZeRO-3 named only in a DeepSpeed JSON (deepspeed_config_file in the accelerate config) is refused too
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3}}', encoding="utf-8")
    with pytest.raises(ConfigError, match="not supported with FSDP or DeepSpeed ZeRO-3"):
        load_config(["--config", str(path)], env={"ACCELERATE_USE_DEEPSPEED": "true",
                                                   "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)}, training=True)
    try:
        assert load_config(["--config", str(path)], env={**zero, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, training=True)
    except ConfigError as e:  # without CUDA or deepspeed the launch itself is refused (tests/test_distributed.py)
        assert e.problems and not any("LoRA" in problem for problem in e.problems)
        assert not torch.cuda.is_available() or not _installed("deepspeed")


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("loss,norm", [(float("nan"), 1.0), (2.0, float("inf")), (2.0, None), (float("inf"), None)])
def test_a_nonfinite_step_leaves_weights_and_optimizer_state_untouched(on_device, loss, norm):
    """step_unless_nonfinite, on the device (fused AdamW's found_inf) or on the host: a NaN/inf loss or gradient
    norm changes no weight, moment or step count, bit for bit; a finite step is exactly a plain step."""
    import copy

    from accelerate import Accelerator

    from whisper_ft.trainable import skips_on_device, step_unless_nonfinite

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
    assert skips_on_device(optimizer, accelerator)
    reference = copy.deepcopy(model)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, fused=True)
    for step in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for m in (model, reference):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        bad = step == 1
        step_unless_nonfinite(optimizer, torch.tensor(loss if bad else 2.0),
                              None if norm is None else torch.tensor(norm if bad else 1.0), on_device=on_device)
        if not bad or math.isfinite(loss) and (norm is None or math.isfinite(norm)):
            reference_optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
        states = [(optimizer.state[p], reference_optimizer.state[q])
                  for p, q in zip(model.parameters(), reference.parameters())]
        assert all(torch.equal(mine[k], theirs[k]) for mine, theirs in states for k in theirs)
        assert not hasattr(optimizer.optimizer, "found_inf")  # nothing left for the next step to trip over
    assert int(optimizer.state[next(model.parameters())]["step"]) == (3 if norm is None and math.isfinite(loss)
                                                                       else 2)


def test_under_fp16_the_loss_scaler_skips_a_nonfinite_step_on_the_device():
    """fp16 (the guide's setting): the loss scaler hands the fused AdamW its own flag; a NaN loss makes the
    gradients NaN, so the step is skipped there too (and the scale backs off, as for any fp16 overflow)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from whisper_ft.trainable import step_unless_nonfinite

    Accelerator(cpu=True)
    torch.manual_seed(0)
    model, scaler = torch.nn.Linear(4, 3), torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = AcceleratedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), scaler=scaler)
    changed = []
    for bad in (False, True, False):
        loss = model(torch.randn(2, 4)).sum() * (float("nan") if bad else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer.optimizer)  # what accelerator.clip_grad_norm_ does first
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [p.detach().clone() for p in model.parameters()]
        step_unless_nonfinite(optimizer, loss.detach(), norm, on_device=True)
        changed.append(not all(torch.equal(p, b) for p, b in zip(model.parameters(), before)))
        optimizer.zero_grad()
    assert changed == [True, False, True]
    assert int(optimizer.state[model.weight]["step"]) == 2 and scaler.get_scale() == 512.0


@pytest.mark.slow
def test_8bit_adamw_on_cpu_is_one_clear_message(tiny_model, tmp_path):
    proc = run_train(base_config(tiny_model, tmp_path / "x", optim="adamw_8bit"), tmp_path,
                     env={"ACCELERATE_USE_CPU": "true"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optim adamw_8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizers do not run on CPU)" in proc.stderr
    assert "or use optim: adamw_torch" in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was loaded or written


def test_lora_target_modules_take_a_list_or_a_string(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_target_modules: [q_proj, v_proj]\n", encoding="utf-8")
    assert load_config(["--config", str(path)], env={}).lora_target_modules == "q_proj,v_proj"
    assert load_config(["--lora-target-modules", "q_proj, fc1"], env={}).lora_target_modules == "q_proj, fc1"
    path.write_text("lora_target_modules: [q_proj, {a: 1}]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="lora_target_modules must be a single value"):
        load_config(["--config", str(path)], env={})


@pytest.mark.slow
def test_unknown_lora_target_or_too_long_feature_mask_is_a_model_error(tiny_model):
    from transformers import WhisperForConditionalGeneration

    from whisper_ft import trainable
    from whisper_ft.model import ModelError

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    with pytest.raises(ModelError, match="q_porj is not a Linear layer of this model; its Linear layers are "
                                         "fc1, fc2, k_proj, out_proj, proj_out, q_proj, v_proj"):
        trainable.setup_model(model, Config(lora_r=4, lora_target_modules="q_porj,v_proj"), print)
    with pytest.raises(ModelError, match="mask_feature_length 81 exceeds the model's 80 mel bins"):
        trainable.setup_model(model, Config(apply_spec_augment=True, mask_feature_length=81), print)


@pytest.mark.slow
def test_a_checkpoint_stored_in_fp16_is_loaded_in_fp32(tiny_model, tmp_path):
    """large-v3 and large-v3-turbo are stored in fp16 and transformers 5 loads a checkpoint in its stored dtype:
    a run would train fp16 weights (and on the CPU fail at the first conv). load_whisper asks for fp32."""
    import shutil

    from transformers import WhisperForConditionalGeneration

    from whisper_ft.languages import resolve
    from whisper_ft.model import load_whisper

    half = tmp_path / "half"
    shutil.copytree(tiny_model, half)
    WhisperForConditionalGeneration.from_pretrained(tiny_model).half().save_pretrained(half)
    assert WhisperForConditionalGeneration.from_pretrained(half).dtype == torch.float16  # what the bug was
    _, model = load_whisper(str(half), resolve("en"), "transcribe")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.slow
def test_lora_under_bf16_trains_a_bf16_base_and_exports_an_fp32_merge(tiny_model, tmp_path):
    """LoRA under bf16: the frozen base is held in bf16 (half the memory), the adapters and their gradients in
    fp32, and the export merges the adapters into an fp32 reload of the base: exactly the merge into the
    fp32 base, not its bf16 rounding."""
    from transformers import WhisperForConditionalGeneration

    from whisper_ft import trainable
    from whisper_ft.languages import resolve
    from whisper_ft.model import load_whisper

    cfg = Config(whisper_pretrained=str(tiny_model), lang="en", lora_r=4, lora_dropout=0.0)
    assert trainable.base_dtype(cfg, "bf16") == torch.bfloat16
    assert trainable.base_dtype(cfg, "fp16") == trainable.base_dtype(cfg, "no") == torch.float32
    assert trainable.base_dtype(Config(), "bf16") == torch.float32  # a full fine-tune keeps fp32 master weights

    _, base = load_whisper(str(tiny_model), resolve("en"), "transcribe", dtype=trainable.base_dtype(cfg, "bf16"))
    model = trainable.setup_model(base, cfg, print)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: lora_B starts at zero, which would merge to nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.train()
    features = torch.randn(2, 80, 3000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_features=features, labels=torch.tensor([[5, 6, 7], [8, 9, 10]])).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads) and any(g.abs().sum() > 0 for g in grads)

    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    merged = trainable.exportable(model, cfg, tmp_path, resolve("en")).state_dict()
    reference = trainable.add_lora(WhisperForConditionalGeneration.from_pretrained(tiny_model), cfg)
    assert not reference.load_state_dict(adapter, strict=False).unexpected_keys
    expected = reference.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    plain = WhisperForConditionalGeneration.from_pretrained(tiny_model).state_dict()
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.float32 and not torch.equal(merged[q], plain[q])  # the update is in it
    # and it is not the bf16 rounding of that merge
    assert not torch.equal(merged[q], merged[q].bfloat16().float())


@pytest.mark.slow
def test_lora_under_autocast_does_not_copy_activations_to_fp32(tiny_model):
    """peft casts each adapter's input to the adapter's dtype (fp32), and autocast casts it straight back to bf16
    for the matmul: two copies of an activation per adapter for nothing. Under autocast the loop turns that cast
    off (trainable.add_lora). bf16 -> fp32 -> bf16 is exact, so logits and gradients stay bit-identical."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from whisper_ft import trainable
    from whisper_ft.languages import resolve
    from whisper_ft.model import load_whisper

    class Fp32Copies(TorchDispatchMode):  # activation-sized tensors cast to fp32 (weights are far smaller)
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32 and out.numel() >= 1500 * 64:
                self.count += 1
            return out

    cfg = Config(whisper_pretrained=str(tiny_model), lang="en", lora_r=4, lora_dropout=0.0)
    features, labels = torch.randn(2, 80, 3000), torch.tensor([[5, 6, 7], [8, 9, 10]])
    results = {}
    for autocast in (False, True):
        _, base = load_whisper(str(tiny_model), resolve("en"), "transcribe", dtype=torch.bfloat16)
        torch.manual_seed(0)  # the same lora_A initialisation in both
        model = trainable.setup_model(base, cfg, print, autocast=autocast)
        with torch.no_grad():  # the same trained-looking adapters in both (lora_B starts at zero)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        model.train()
        with Fp32Copies() as copies:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_features=features, labels=labels).logits
            logits.float().logsumexp(-1).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[autocast] = (copies.count, logits, grads)
    (copies_peft, logits_peft, grads_peft), (copies_ours, logits_ours, grads_ours) = results[False], results[True]
    assert copies_peft > 0 and copies_ours == 0  # peft's casts are seen, and gone
    assert torch.equal(logits_ours, logits_peft)
    assert grads_ours.keys() == grads_peft.keys() and all(torch.equal(grads_ours[n], grads_peft[n]) for n in grads_ours)


# ---- SpecAugment ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_spec_augment_masks_features_only_in_training(tiny_model):
    from transformers import WhisperForConditionalGeneration

    from whisper_ft import trainable

    def encoded(model, features):  # Whisper masks input_features in place: give each call its own copy
        return model.model(input_features=features.clone(),
                           decoder_input_ids=torch.tensor([[1, 2]] * len(features))).encoder_last_hidden_state

    torch.manual_seed(0)
    features = torch.randn(2, 80, 3000)
    plain = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    augmented = trainable.setup_model(
        WhisperForConditionalGeneration.from_pretrained(tiny_model),
        Config(apply_spec_augment=True, mask_time_prob=0.3, mask_feature_prob=0.3, mask_feature_length=8), print)
    assert augmented.config.apply_spec_augment and augmented.config.mask_feature_length == 8
    plain.eval(), augmented.eval()
    reference = encoded(plain, features)
    assert torch.equal(encoded(augmented, features), reference)  # inference is untouched
    plain.train(), augmented.train()
    assert torch.equal(encoded(plain, features), reference)  # the tiny model has no dropout: train == eval
    first, second = encoded(augmented, features), encoded(augmented, features)
    assert not torch.equal(first, reference) and not torch.equal(first, second)  # a new mask every forward
    # what is masked: whole time steps and whole mel bins, set to 0
    masked = augmented.model._mask_input_features(features.clone())
    zero_bins = (masked == 0).all(dim=2).any(dim=0).sum()
    zero_frames = (masked == 0).all(dim=1).sum()
    assert zero_bins >= 8 and zero_frames >= 10


# ---- LoRA and the frozen encoder, end to end --------------------------------------------------------


@pytest.mark.slow
def test_lora_resume_is_step_exact_with_spec_augment(tiny_model, tmp_path):
    """LoRA with dropout and SpecAugment (both draw random numbers) and accumulation: 6 steps straight ==
    2 + resume + 2 + resume + 2, bit for bit; checkpoints hold the adapter weights only; the best
    checkpoint is reloaded through them and exported merged."""
    # greater_is_better on the loss picks the worst step as "best": an earlier step than the last, so the
    # export goes through the best-model reload (accelerator.load_state of an adapter-only checkpoint)
    cfg = dict(gradient_accumulation_steps=2, save_steps=2, eval_steps=2, max_steps=6, save_total_limit=0,
               lora_r=4, lora_dropout=0.1, apply_spec_augment=True, mask_time_prob=0.2, mask_feature_prob=0.2,
               greater_is_better=True)
    straight, resumed, first, proc = straight_and_resumed(tiny_model, tmp_path, cfg, (2, 4, 6))
    # rank 4 adds 4 x (in + out) per Linear: per encoder layer 4 x 64x64 attention + 64x256 + 256x64 = 4608,
    # per decoder layer 8 attention (self and cross) + the two = 6656; two layers each; base 512,192
    assert "training 22,528 of 534,720 parameters (4.21%); LoRA rank 4" in first.stderr
    assert train_rows(straight) == train_rows(resumed) and len(train_rows(straight)) == 6
    a = load_file(straight / "checkpoint-6" / "model.safetensors")
    b = load_file(resumed / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # 2 layers x (encoder: q,k,v,out,fc1,fc2; decoder: those + cross-attention q,k,v,out) x (A, B)
    assert len(a) == 2 * (6 + 10) * 2 and all(".lora_A." in k or ".lora_B." in k for k in a)
    optimizer = torch.load(straight / "checkpoint-6" / "optimizer.bin", weights_only=False)
    assert len(optimizer["state"]) == len(a)  # AdamW moments for the adapter only
    x, y = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)  # and so the merged exports are identical too

    # the export is the base merged with the adapter of the best checkpoint, not of the last one
    from transformers import WhisperForConditionalGeneration

    from whisper_ft import trainable

    best = json.loads((straight / "checkpoint-6" / "trainer_state.json").read_text())["best_step"]
    assert best in (2, 4) and "exporting that model" in proc.stderr
    model = trainable.add_lora(WhisperForConditionalGeneration.from_pretrained(tiny_model),
                               Config(lora_r=4, lora_dropout=0.1))
    adapter = load_file(straight / f"checkpoint-{best}" / "model.safetensors")
    assert not model.load_state_dict(adapter, strict=False).unexpected_keys
    merged = model.merge_and_unload().state_dict()
    assert x.keys() <= merged.keys() and all(torch.equal(x[k], merged[k]) for k in x)
    assert not torch.equal(adapter[next(iter(adapter))], a[next(iter(adapter))])  # the last step's differs


def test_resuming_with_another_training_mode_is_refused():
    """A checkpoint holds the trainable weights of its mode (and that optimizer's state): another mode cannot
    load it, so the run is refused as a different run, as for a changed model or data set."""
    from whisper_ft.state import resume_state
    from whisper_ft.stopping import RunStopped

    saved = {"config": Config(lora_r=4).public_dict(), "mixture_sha256": None}
    for change in ({"lora_r": 8}, {"lora_alpha": 16.0}, {"lora_target_modules": "q_proj"}, {"freeze_encoder": True},
                   {"optim": "adamw_8bit"}):
        with pytest.raises(RunStopped, match=f"belong to a different run: {next(iter(change))} was"):
            resume_state(dict(saved), Config(**{"lora_r": 4, **change}), print)
    assert resume_state(dict(saved), Config(lora_r=4, lora_dropout=0.2, mask_time_prob=0.1), print)  # noted only


@pytest.mark.slow
def test_freeze_encoder_leaves_the_encoder_bit_identical(tiny_model, tmp_path):
    out = tmp_path / "frozen"
    proc = run_train(base_config(tiny_model, out, max_steps=3, save_steps=3, eval_steps=3, freeze_encoder=True,
                                 gradient_checkpointing=True), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoder frozen" in proc.stderr
    base, tuned = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    encoder = [k for k in base if k.startswith("model.encoder.")]
    decoder = [k for k in base if k.startswith("model.decoder.") and "embed_positions" not in k]
    assert encoder and all(torch.equal(base[k], tuned[k]) for k in encoder)
    assert all(not torch.equal(base[k], tuned[k]) for k in decoder if k.endswith("q_proj.weight"))
    saved = load_file(out / "checkpoint-3" / "model.safetensors")
    assert saved and not any("encoder." in k and "encoder_attn" not in k for k in saved)  # no frozen copies
    optimizer = torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=False)
    assert len(optimizer["state"]) == len(saved)


NO_PEFT = "import sys; sys.modules['peft'] = None  # written by test_trainable: this interpreter has no peft\n"


@pytest.mark.slow
def test_lora_learns_and_exports_a_plain_whisper_that_loads_without_peft(learned_run, tmp_path):
    """LoRA teaches a model that reads English (the shared 150-step run, standing in for a pretrained
    Whisper) the Assamese clips: WER falls from babble (over 100%) to under half of that. The export is the
    adapter merged into the base, and it loads, evaluates, transcribes and exports to CTranslate2 where peft
    cannot be imported, with the logits of base + adapter.

    From a random-init tiny model LoRA lowers the loss but not the WER: its frozen random weights never
    learn to stop decoding; a pretrained base is what LoRA is for.
    """
    base = learned_run[0]
    out = tmp_path / "lora"
    cfg = base_config(base, out, lang="as", dataset_name=str(CV_AS), eval_split="train", lora_r=16,
                      lora_dropout=0.0, lora_save_adapter=True, learning_rate=5e-3, warmup_steps=5, max_steps=60,
                      eval_steps=60, save_steps=60, logging_steps=10, eval_at_start=True, predict_with_generate=True,
                      generation_max_length=24, metric_for_best_model="wer")
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [(r["step"], r["eval_samples"]) for r in evals] == [(0, 4), (60, 4)]
    assert evals[0]["eval_wer"] > 100 and evals[1]["eval_wer"] < evals[0]["eval_wer"] / 2, evals
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] / 3, evals
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))

    # base + adapter, unmerged, computed here with peft
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(1))
    sot = json.loads((base / "config.json").read_text())["decoder_start_token_id"]
    tokens = torch.tensor([[sot, sot + 1, 70, 80], [sot, sot + 1, 50, 10]])
    with_adapter = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(base),
                                             out / "adapter").eval()
    with torch.no_grad():
        expected = with_adapter(input_features=features, decoder_input_ids=tokens).logits
    merged = with_adapter.merge_and_unload().state_dict()
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(merged[k], exported[k]) for k in exported)  # the export is exactly that merge
    torch.save({"features": features, "tokens": tokens, "expected": expected}, tmp_path / "probe.pt")

    # where peft cannot be imported: from_pretrained (no missing keys), the logits, the ASR pipeline
    (tmp_path / "nopeft").mkdir()
    (tmp_path / "nopeft" / "sitecustomize.py").write_text(NO_PEFT)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'nopeft'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    check = f"""
import numpy as np, torch
try:
    import peft
    raise SystemExit("peft imported")
except ImportError:
    pass
from transformers import WhisperForConditionalGeneration, pipeline
model, info = WhisperForConditionalGeneration.from_pretrained({str(out)!r}, output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
probe = torch.load({str(tmp_path / 'probe.pt')!r})
with torch.no_grad():
    logits = model.eval()(input_features=probe["features"], decoder_input_ids=probe["tokens"]).logits
print("max_diff", float((logits - probe["expected"]).abs().max()))
asr = pipeline("automatic-speech-recognition", model={str(out)!r})
audio = {{"raw": np.zeros(16000, np.float32), "sampling_rate": 16000}}
print("pipeline", type(asr(audio, generate_kwargs={{"max_new_tokens": 8}})["text"]).__name__)
"""
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    diff = float(done.stdout.split("max_diff ")[1].split()[0])
    assert diff < 1e-4, diff  # merging reorders float sums: W x + s B A x vs (W + s B A) x
    assert "pipeline str" in done.stdout

    # the project's own tools, still without peft
    evaluated = subprocess.run([sys.executable, "-m", "whisper_ft.cli.evaluate", "--config", str(out / "config.yaml"),
                                "--model", str(out), "--split", "train", "--max-eval-samples", "16",
                                "--generation-max-length", "8", "--output-dir", str(tmp_path / "eval")],
                               cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["metrics"]["eval_samples"] == 4
    assert summary["metrics"]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-4)  # the trained model
    transcribed = subprocess.run([sys.executable, "-m", "whisper_ft.cli.transcribe", "--model", str(out),
                                  str(CV_AS / "clips" / "common_voice_as_000001.mp3"), "--output-dir",
                                  str(tmp_path / "tx"), "--device", "cpu"],
                                 cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert transcribed.returncode == 0, transcribed.stderr[-3000:]
    assert (tmp_path / "tx" / "common_voice_as_000001.txt").read_text().strip()
    pytest.importorskip("ctranslate2")
    exported_ct2 = subprocess.run([sys.executable, "-m", "whisper_ft.cli.export", "--model", str(out), "--quantization",
                                   "float32", "--output-dir", str(tmp_path / "ct2"), "--verify",
                                   str(CV_AS / "clips" / "common_voice_as_000001.mp3"), "--max-new-tokens", "16"],
                                  cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert exported_ct2.returncode == 0, exported_ct2.stderr[-3000:]


# ---- the large-v3 layout ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_large_v3(tmp_path_factory):
    from whisper_ft import tiny

    texts = tiny.texts_from_tsv(CV_EN / "validated.tsv") + tiny.texts_from_tsv(CV_EN.parent / "cv-as" / "train.tsv")
    return tiny.build(tmp_path_factory.mktemp("tiny_v3") / "model", texts, num_mel_bins=128)


@pytest.mark.slow
def test_tiny_large_v3_has_the_large_v3_layout(tiny_large_v3):
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_large_v3)
    config = json.loads((tiny_large_v3 / "config.json").read_text())
    assert config["num_mel_bins"] == processor.feature_extractor.feature_size == 128
    tok = processor.tokenizer
    sot = tok.convert_tokens_to_ids("<|startoftranscript|>")
    # offsets from <|startoftranscript|> in openai/whisper-large-v3 (sot 50258, vocab 51866)
    offsets = {"<|endoftext|>": -1, "<|en|>": 1, "<|yue|>": 100, "<|translate|>": 101, "<|transcribe|>": 102,
               "<|notimestamps|>": 106, "<|0.00|>": 107, "<|30.00|>": 1607}
    assert {t: tok.convert_tokens_to_ids(t) - sot for t in offsets} == offsets
    assert config["vocab_size"] == len(tok) == sot + 1608


@pytest.mark.slow
def test_large_v3_layout_trains_evaluates_and_exports(tiny_large_v3, tmp_path):
    """128 mel bins through data, training (here with LoRA, the way large-v3 fits a small card), evaluation
    and the CTranslate2 export."""
    out = tmp_path / "v3"
    cfg = base_config(tiny_large_v3, out, lora_r=4, max_steps=2, save_steps=2, eval_steps=2, predict_with_generate=True,
                      generation_max_length=12, metric_for_best_model="wer", max_eval_samples=4)
    proc = run_train(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(out) if "eval_wer" in r] == [2]
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(out)
    assert model.config.num_mel_bins == WhisperProcessor.from_pretrained(out).feature_extractor.feature_size == 128
    evaluated = subprocess.run([sys.executable, "-m", "whisper_ft.cli.evaluate", "--config", str(out / "config.yaml"),
                                "--model", str(out), "--max-eval-samples", "4", "--output-dir", str(tmp_path / "e")],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["metrics"]["eval_samples"] == 4
    transcribed = subprocess.run([sys.executable, "-m", "whisper_ft.cli.transcribe", "--model", str(out),
                                  "--device", "cpu", str(CV_EN / "clips" / "common_voice_en_000001.mp3"),
                                  "--output-dir", str(tmp_path / "t"), "--format", "json"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert transcribed.returncode == 0, transcribed.stderr[-3000:]
    assert (tmp_path / "t" / "common_voice_en_000001.json").is_file()
    pytest.importorskip("ctranslate2")
    done = subprocess.run([sys.executable, "-m", "whisper_ft.cli.export", "--model", str(out),
                           "--quantization", "float32", "--output-dir", str(tmp_path / "ct2"), "--verify",
                           str(CV_EN / "clips" / "common_voice_en_000001.mp3"), "--max-new-tokens", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "ct2" / "preprocessor_config.json").read_text())["feature_size"] == 128
