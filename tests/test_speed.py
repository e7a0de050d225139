"""The speed features stay correct on CPU: label buckets, the tri-state settings, encoder-only checkpointing,
the FLOP count behind the MFU figure, static-cache generation, and the compiled training path."""

from __future__ import annotations

import math
import time

import pytest
import torch

from conftest import CV_EN, assert_queued_without_readbacks, base_config, metrics, run_train
from whisper_ft.collate import IGNORE_INDEX, LABEL_BUCKETS, Collator
from whisper_ft.config import ConfigError, load_config


def sample(i: int, n_labels: int) -> dict:
    return {"id": str(i), "input_features": torch.zeros(80, 3000).numpy(), "labels": [7] + list(range(10, 10 + n_labels)),
            "seconds": 1.0}


@pytest.mark.parametrize("longest,width", [(5, 32), (32, 32), (33, 64), (200, 256), (300, 448), (448, 448)])
def test_bucketed_labels_pad_to_the_next_bucket(longest, width):
    batch = Collator(decoder_start_token_id=7, bucket=True)([sample(0, 3), sample(1, longest)])
    assert batch["labels"].shape == (2, width)
    assert batch["labels"][1, :longest].tolist() == list(range(10, 10 + longest))  # start token stripped
    assert (batch["labels"][1, longest:] == IGNORE_INDEX).all() and (batch["labels"][0, 3:] == IGNORE_INDEX).all()
    plain = Collator(decoder_start_token_id=7)([sample(0, 3), sample(1, longest)])
    assert plain["labels"].shape == (2, longest)
    assert torch.equal(batch["labels"][:, :longest], plain["labels"])
    assert width in LABEL_BUCKETS


@pytest.mark.slow
def test_a_short_batch_is_padded_with_rows_that_change_no_loss_or_gradient(tiny_model):
    from transformers import WhisperForConditionalGeneration

    from whisper_ft.collate import decoder_inputs
    from whisper_ft.evaluation import token_loss_sum

    samples = [{**sample(i, 5 + i), "input_features": torch.randn(80, 3000).numpy()} for i in range(2)]
    short = Collator(decoder_start_token_id=7, bucket=True)(samples)
    full = Collator(decoder_start_token_id=7, bucket=True, rows=5)(samples)
    assert full["input_features"].shape[0] == full["labels"].shape[0] == 5 and full["ids"] == ["0", "1"]
    assert (full["labels"][2:] == IGNORE_INDEX).all() and not full["input_features"][2:].any()
    assert torch.equal(full["labels"][:2], short["labels"])
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model).eval()  # no dropout; gradients still flow
    shift = decoder_inputs(model.config)
    results = []
    for batch in (short, full):
        model.zero_grad()
        logits = model(input_features=batch["input_features"], decoder_input_ids=shift(batch["labels"])).logits
        loss = token_loss_sum(logits, batch["labels"])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_short, grads_short), (loss_full, grads_full) = results
    # the same sums over the same rows; other matrix shapes round the last bits differently, so each
    # gradient is compared to within 1e-5 of its own largest element (a padding row that leaked in
    # would move it by far more; elementwise rtol fails on near-zero elements of the conv gradients)
    assert torch.allclose(loss_full, loss_short, rtol=1e-6)
    assert len(grads_full) == len(grads_short)
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(grads_full, grads_short))


@pytest.mark.parametrize("args,yaml_text,expect", [
    ([], "lang: en\n", ("false", "auto")),  # an empty config file is an error: set something else
    ([], "gradient_checkpointing: false\ntorch_compile: true\n", ("false", "true")),
    ([], "gradient_checkpointing: encoder\ntorch_compile: no\n", ("encoder", "false")),
    (["--gradient-checkpointing"], "gradient_checkpointing: false\n", ("true", "auto")),
    (["--no-gradient-checkpointing", "--no-torch-compile"], "lang: en\n", ("false", "false")),
    (["--gradient-checkpointing", "encoder", "--torch-compile", "auto"], "lang: en\n", ("encoder", "auto")),
])
def test_tri_state_settings_keep_the_boolean_forms(tmp_path, args, yaml_text, expect):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    cfg = load_config(["--config", str(path), *args], env={})
    assert (cfg.gradient_checkpointing, cfg.torch_compile) == expect


def test_tri_state_rejects_other_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gradient_checkpointing: decoder\ntorch_compile: maybe\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(["--config", str(path)], env={})
    assert "gradient_checkpointing must be one of true, false, encoder" in str(err.value)
    assert "torch_compile must be one of auto, true, false" in str(err.value)


def _loss_and_grads(model, features, labels):
    from whisper_ft.collate import decoder_inputs
    from whisper_ft.evaluation import token_loss_sum

    model.zero_grad(set_to_none=True)
    logits = model(input_features=features, decoder_input_ids=decoder_inputs(model.config)(labels)).logits
    loss = token_loss_sum(logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_encoder_only_checkpointing_recomputes_the_encoder_and_changes_no_gradient(tiny_model):
    from transformers import WhisperForConditionalGeneration

    from whisper_ft.speed import set_gradient_checkpointing

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model).train()
    model.config.use_cache = False
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[50, 60, 70, IGNORE_INDEX], [51, 61, 71, 81]])
    torch.manual_seed(0)
    loss_plain, grads_plain = _loss_and_grads(model, features, labels)

    set_gradient_checkpointing(model, "encoder")
    assert all(layer.gradient_checkpointing for layer in model.model.encoder.layers)
    assert not any(layer.gradient_checkpointing for layer in model.model.decoder.layers)
    calls = {"encoder": 0, "decoder": 0}  # a sub-module's hooks fire again when its layer is recomputed
    hooks = [getattr(model.model, side).layers[0].fc1.register_forward_hook(
        lambda *a, side=side: calls.__setitem__(side, calls[side] + 1)) for side in calls]
    torch.manual_seed(0)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, features, labels)
    for hook in hooks:
        hook.remove()
    assert calls == {"encoder": 2, "decoder": 1}  # the encoder recomputed in backward, the decoder not
    assert torch.equal(loss_plain, loss_ckpt)  # dropout is 0 in the tiny model: recomputation is exact
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_flop_formula_matches_torch_flop_counter(tiny_model):
    """The MFU figure's FLOP count (speed.training_flops_per_sample) against PyTorch's own count of the matmuls,
    convolutions and attention in one forward + backward of the tiny model."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import WhisperForConditionalGeneration

    from whisper_ft.speed import training_flops_per_sample

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model, attn_implementation="eager").train()
    batch, tokens = 2, 24
    features = torch.randn(batch, 80, 3000)
    labels = torch.randint(10, 100, (batch, tokens))
    with FlopCounterMode(display=False) as counter:
        _loss_and_grads(model, features, labels)
    measured = counter.get_total_flops() / batch
    formula = training_flops_per_sample(model.config, tokens)
    # The counter also sees the first conv's input gradient, which is never needed (the features need no
    # gradient) but autograd does not compute it either; what differs is within a few percent.
    assert abs(formula - measured) / measured < 0.03, (formula, measured)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["random", "learned"])
def test_greedy_decoding_gives_the_tokens_of_generate(which, tiny_model, request):
    """Every greedy prediction over the English corpus: evaluation's own decoding loop (whisper_ft.greedy) vs
    transformers' generate() with its dynamic cache (eager) and with the static cache it compiles on a GPU
    (the fallback path), on a random model (every row runs to max_length) and on one that learned the clips
    (rows end at EOS, at different lengths)."""
    from accelerate import Accelerator

    from whisper_ft import batches, greedy
    from whisper_ft.config import Config
    from whisper_ft.data import Prepare
    from whisper_ft.evaluation import evaluate
    from whisper_ft.languages import resolve
    from whisper_ft.model import generate_kwargs, load_whisper
    from whisper_ft.sources import load_records
    from whisper_ft.speed import generation_speedups

    path = tiny_model if which == "random" else request.getfixturevalue("learned_run")[0]
    processor, model = load_whisper(str(path), resolve("en"), "transcribe")
    model.config.use_cache = False  # as in training: generation must still use its cache
    records = load_records(str(CV_EN), "train")  # 25 clips: batches of 8, 8, 8, 1 (a smaller last batch too)
    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    cfg = Config(per_device_eval_batch_size=8, dataloader_num_workers=0)
    loader = batches.eval_loader(records, prepare, Collator(model.config.decoder_start_token_id), cfg, 0, 1)
    kwargs = generate_kwargs(model, 30)
    encoder_calls = []
    hook = model.get_encoder().register_forward_hook(lambda *_: encoder_calls.append(1))
    metrics, rows, _ = evaluate(model, loader, processor.tokenizer, accelerator=Accelerator(cpu=True),
                                generate_kwargs=kwargs)
    hook.remove()
    [used] = model._whisper_ft_greedy.values()
    assert used is not None and used.caches == {}  # our loop ran, did not fall back, and freed its caches
    assert len(encoder_calls) == len(loader) == 4  # once per batch: the loss and the decoding share it
    loss_only, _, _ = evaluate(model, loader, processor.tokenizer, accelerator=Accelerator(cpu=True),
                               generate_kwargs=None)
    assert metrics["eval_loss"] == loss_only["eval_loss"]  # the shared encoder output is the loss forward's own

    ours = greedy.Greedy(model, processor.tokenizer.prefix_tokens, kwargs)
    padded = greedy.Greedy(model, processor.tokenizer.prefix_tokens, kwargs, rows=8)  # as with a compiled step
    eos = model.generation_config.eos_token_id
    expected, ended_early = {}, 0
    for batch in loader:
        features = batch["input_features"]
        mask = torch.ones(features.shape[::2], dtype=torch.long)
        dynamic = model.generate(input_features=features, attention_mask=mask, **kwargs)
        static = model.generate(input_features=features, attention_mask=mask, **kwargs, **generation_speedups(True))
        tokens = ours(features)
        assert torch.equal(padded(features), tokens)  # the last batch (1 clip) padded to 8: same tokens, same stop
        for a, b, c in zip(dynamic.tolist(), static.tolist(), tokens.tolist()):
            ended = a[: a.index(eos) + 1] if eos in a else a  # generate pads ended rows
            assert ended == b[: len(ended)] == c[: len(ended)] and set(c[len(ended):]) <= {eos}
            ended_early += eos in a and len(ended) < 30 + len(processor.tokenizer.prefix_tokens)
        expected.update(zip(batch["ids"], processor.tokenizer.batch_decode(dynamic, skip_special_tokens=True)))
    assert len(rows) == len(records) == 25
    assert [r["prediction"] for r in rows] == [expected[r["id"]].strip() for r in rows]
    assert sum(len(r["prediction"]) for r in rows) > 0  # the model says something, not nothing
    if which == "learned":
        assert ended_early >= 20  # the EOS path: a model that reads the clips stops before max_length


def test_greedy_decoding_falls_back_to_generate_once(tiny_model, monkeypatch):
    """A transformers release that changes the decoder's interface breaks our loop, not the evaluation: one
    warning, then generate() for this and every later batch."""
    from accelerate import Accelerator

    from whisper_ft import batches, greedy
    from whisper_ft.config import Config
    from whisper_ft.data import Prepare
    from whisper_ft.evaluation import evaluate
    from whisper_ft.languages import resolve
    from whisper_ft.model import generate_kwargs, load_whisper
    from whisper_ft.sources import load_records

    processor, model = load_whisper(str(tiny_model), resolve("en"), "transcribe")
    records = load_records(str(CV_EN), "train")[:12]
    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    loader = batches.eval_loader(records, prepare, Collator(model.config.decoder_start_token_id),
                                 Config(per_device_eval_batch_size=4, dataloader_num_workers=0), 0, 1)
    accelerator, kwargs = Accelerator(cpu=True), generate_kwargs(model, 20)
    _, reference, _ = evaluate(model, loader, processor.tokenizer, accelerator, generate_kwargs=kwargs)
    del model._whisper_ft_greedy
    calls = []

    def broken(self, features, encoder_states=None):
        calls.append(1)
        raise TypeError("forward() got an unexpected keyword argument 'cache'")

    monkeypatch.setattr(greedy.Greedy, "__call__", broken)
    with pytest.warns(UserWarning, match="greedy decoding failed .TypeError: forward.. got an unexpected keyword "
                                         "argument 'cache'.; evaluating with generate.. instead") as caught:
        _, rows, _ = evaluate(model, loader, processor.tokenizer, accelerator, generate_kwargs=kwargs)
    assert len(calls) == 1 and len([w for w in caught if "greedy decoding failed" in str(w.message)]) == 1
    assert rows == reference


def test_eval_batches_are_ordered_by_length():
    from whisper_ft import batches
    from whisper_ft.config import Config
    from whisper_ft.data import Record

    records = [Record(id=str(i), text="x" * n) for i, n in enumerate([30, 5, 50, 10, 40, 20])]

    class Echo:
        def screen(self, r):
            return None

        def __call__(self, r):
            return r.id

    cfg = Config(per_device_eval_batch_size=2, dataloader_num_workers=0)
    seen = [b for b in batches.eval_loader(records, Echo(), lambda xs: xs, cfg, 0, 1)]
    assert seen == [["1", "3"], ["5", "0"], ["4", "2"]]
    shards = [sum(batches.eval_loader(records, Echo(), lambda xs: xs, cfg, r, 2), []) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(r.id for r in records)  # each sample on exactly one process


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_compiled_training_matches_eager_per_step(mode, tiny_model_1layer, tmp_path):
    """train_loop.py with torch_compile: true (forced on CPU) against false: per-step losses within rel 1e-4.

    fp32; the compiled side also pads labels to buckets and the epoch's short last batch (25 clips at batch
    8: step 4 has one) to full size, without a recompilation. Inductor on CPU fuses and reorders float sums,
    so the losses are close, not bitwise equal. LoRA too: on a GPU, compiling is what fuses peft's element-wise
    work around each adapter (its dropout is off here: compiled code draws other random numbers). About 20 s
    (full) and 40 s (LoRA) on 2 CPU cores, almost all of it compiling.
    """
    extra = {"lora_r": 4, "lora_dropout": 0.0} if mode == "lora" else {}
    losses, started = {}, time.perf_counter()
    for compile_on in ("false", "true"):
        out = tmp_path / compile_on
        cfg = base_config(tiny_model_1layer, out, max_steps=4, per_device_train_batch_size=8, eval_strategy="no",
                          load_best_model_at_end=False, torch_compile=compile_on, **extra)
        proc = run_train(cfg, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"torch_compile {'on' if compile_on == 'true' else 'off'}" in proc.stderr
        assert "compilation failed" not in proc.stderr
        rows = metrics(out)
        losses[compile_on] = [r["loss"] for r in rows if "loss" in r]
        for r in (r for r in rows if "loss" in r):
            assert r["samples_per_second"] > 0
            assert r["mfu_percent"] is None and r["peak_gpu_memory_gb"] is None  # CPU: no known peak, no GPU
        if compile_on == "true":
            final = rows[-1]
            assert final["compiled_graphs"] >= 1 and final["recompiled_graphs"] == 0  # one bucket, one batch size
    assert len(losses["true"]) == len(losses["false"]) == 4
    for eager, compiled in zip(losses["false"], losses["true"]):
        assert math.isfinite(eager) and abs(compiled - eager) <= 1e-4 * abs(eager), (losses, time.perf_counter() - started)


def test_a_training_step_is_queued_without_reading_anything_back(tiny_model, tmp_path):
    """On a GPU every read of a tensor's value (float(loss), bool(flag)) waits for the queued work and leaves the
    card idle until the host queues the next. So train_step reads nothing back, NaN/inf steps included (the fused
    AdamW skips them itself), and between two steps only settle() reads the step before while the next one runs;
    the rest reads back only where it logs or saves (steps 4 and 8 here). Counted on CPU through the same
    dispatcher op (aten._local_scalar_dense) that a CUDA read-back goes through."""
    assert_queued_without_readbacks(tiny_model, tmp_path)


def test_graphs_compiled_elsewhere_are_not_recompilations_of_the_training_forward(monkeypatch):
    """dynamo's graph counter is per process: evaluation's compiled decoder step must not show up as
    recompilations of the training forward (the figure that says whether shapes are bucketed)."""
    from whisper_ft import speed

    count = [0]
    monkeypatch.setattr(speed, "_graphs", lambda: count[0])

    def compiled(new_graphs):
        count[0] += new_graphs
        return new_graphs

    forward = speed.CompiledForward(None, enabled=False, say=print)
    forward.compiled = compiled
    assert forward.stats() == {}
    forward(new_graphs=2)  # the first call: a forward graph and a graph break
    count[0] += 5  # evaluation compiles its decoder step
    forward(new_graphs=0), forward(new_graphs=1)  # then a new label bucket
    assert forward.stats() == {"compiled_graphs": 3, "recompiled_graphs": 1}


@pytest.mark.slow
def test_compile_failure_falls_back_to_eager_once(tiny_model):
    from transformers import WhisperForConditionalGeneration

    from whisper_ft.speed import CompiledForward

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model).eval()
    messages = []
    forward = CompiledForward(model, enabled=True, say=messages.append)
    assert forward.active

    def broken(**inputs):
        raise RuntimeError("backend compiler failed: no C++ compiler")

    forward.compiled = broken  # what a failing compilation looks like at the first call
    inputs = {"input_features": torch.randn(1, 80, 3000), "decoder_input_ids": torch.tensor([[1, 2, 3]])}
    with torch.no_grad():
        out = forward(**inputs).logits
        again = forward(**inputs).logits
        expected = model(**inputs).logits
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert not forward.active and len(messages) == 1
    assert "compilation failed (RuntimeError: backend compiler failed" in messages[0] and "eagerly" in messages[0]

    def out_of_memory(**inputs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    forward.compiled = out_of_memory  # a real error is not hidden by the fallback
    with pytest.raises(torch.OutOfMemoryError):
        forward(**inputs)


def test_a_prediction_is_one_decoding_pass_of_at_most_max_length_new_tokens(tiny_model):
    """A random model emits timestamp tokens after <|notimestamps|>; transformers would then decode the clip
    again from that timestamp and glue the passes (docs/DESIGN.md "one decoding pass")."""
    from whisper_ft.data import Prepare
    from whisper_ft.languages import resolve
    from whisper_ft.model import generate_kwargs, load_whisper
    from whisper_ft.sources import load_records

    processor, model = load_whisper(str(tiny_model), resolve("en"), "transcribe")
    prepare = Prepare(processor.feature_extractor, processor.tokenizer)
    features = torch.stack([torch.as_tensor(prepare(r)["input_features"]) for r in load_records(str(CV_EN), "dev")])
    prefix = len(processor.tokenizer.prefix_tokens)
    first_timestamp = processor.tokenizer.convert_tokens_to_ids("<|0.00|>")
    with torch.no_grad():
        out = model.generate(input_features=features, **generate_kwargs(model, 10))
    assert out.shape[1] <= prefix + 10
    assert (out[:, prefix:] >= first_timestamp).any()  # the case this is about: timestamps were predicted
