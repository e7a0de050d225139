"""Fine-tune Whisper on one language or domain.

    accelerate launch [--gpu_ids 1] train_loop.py --config config.yaml [--learning-rate 3e-5 ...]
    python train_loop.py --config config.yaml            # one process
    bash launch.sh [GPU_ID] [flags]                      # in the background, logging to train.log

Rerunning the same command resumes from the newest complete checkpoint in checkpoint_dir.
The whole run reads top to bottom in train(); the pieces it calls live in whisper_ft/.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from whisper_ft.config import Config, ConfigError, config_warnings, dump_yaml, load_config, trackers

EXIT_CONFIG, EXIT_ERROR, EXIT_STOPPED = 2, 1, 3


def main(argv: list[str] | None = None) -> int:
    # Everything that can be checked without the model and data is checked first: a wrong GPU, token or
    # setting must stop the run in seconds, not after the model has loaded or a night has passed.
    try:
        cfg = load_config(argv, training=True)
        from whisper_ft import device
        on_cpu = device.choose(cfg)  # before anything touches CUDA
    except ConfigError as e:
        print(f"whisper-ft: the configuration has problems:\n{e}", file=sys.stderr)
        return EXIT_CONFIG
    from whisper_ft import hub
    try:
        token_note = hub.check_token(cfg, offline=os.environ.get("HF_HUB_OFFLINE", "").upper() in
                                     ("1", "ON", "YES", "TRUE"))
    except hub.HubError as e:
        print(f"whisper-ft: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for note in ["warning: " + w for w in config_warnings(cfg)] + ([token_note] if token_note else []):
            print(f"whisper-ft: {note}", file=sys.stderr, flush=True)
    from whisper_ft.checkpoint import CheckpointError
    from whisper_ft.data import DataError
    from whisper_ft.model import ModelError
    from whisper_ft.stopping import RunStopped

    try:
        return train(cfg, on_cpu)
    except (DataError, ModelError, CheckpointError) as e:
        print(f"whisper-ft: {e}", file=sys.stderr)
        return EXIT_ERROR
    except RunStopped as e:
        print(f"whisper-ft: {e}", file=sys.stderr)
        return e.exit_code


def train(cfg: Config, on_cpu: bool = False) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm

    from whisper_ft import batches, checkpoint, device, run, sharding, speed, stopping, trainable
    from whisper_ft.collate import Collator, decoder_inputs
    from whisper_ft.data import BadCounter, Prepare
    from whisper_ft.evaluation import evaluate, token_loss_sum
    from whisper_ft.languages import resolve
    from whisper_ft.metrics_log import MetricsLog, start_trackers
    from whisper_ft.model import generate_kwargs, load_whisper
    from whisper_ft.schedule import lr_at, set_lr

    # ---- set up: processes, model, data -----------------------------------------------------
    out = Path(cfg.checkpoint_dir)
    accelerator = Accelerator(
        cpu=on_cpu,  # -g cpu: deliberately, whatever GPUs there are
        mixed_precision=run.mixed_precision(cfg, on_cpu),
        log_with=trackers(cfg) or None, project_dir=str(out),  # report_to, through accelerate's trackers
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # Each process reads its own shard; batches differ in shape, so nothing is dispatched (pitfall 5).
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        step_scheduler_with_optimizer=False,  # the LR is a pure function of the step (pitfall 4)
    )
    say = run.Reporter(accelerator)
    say(device.describe(accelerator))
    set_seed(cfg.seed)
    lang = resolve(cfg.lang)
    processor, model = speed.load_fastest(load_whisper, cfg, lang, accelerator.mixed_precision, say)
    model.config.use_cache = False  # caching is for generation; in training it only costs memory
    speed.set_gradient_checkpointing(model, cfg.gradient_checkpointing)  # non-reentrant: fine with frozen weights
    model = trainable.setup_model(model, cfg, say)  # SpecAugment, freeze_encoder, LoRA
    compile_on = speed.compile_wanted(cfg.torch_compile)
    prepare = Prepare(processor.feature_extractor, processor.tokenizer,
                      timestamp_probability=cfg.timestamp_probability, seed=cfg.seed)
    collate = Collator(model.config.decoder_start_token_id)
    # A compiled forward gets label widths from a few buckets, so new transcript lengths do not recompile it.
    train_collate = Collator(model.config.decoder_start_token_id, bucket=compile_on)
    rank, world = accelerator.process_index, accelerator.num_processes

    train_records, eval_records = batches.load_data(cfg, lang, prepare, say)
    eval_sets = batches.load_eval_sets(cfg, lang, prepare, say, eval_records)  # {"eval": ...} without eval_sets
    bad = BadCounter()  # unusable training samples, counted when drawn: the same on every process

    # Groups and counts come from the whole model, before FSDP/DeepSpeed shard it in prepare.
    optimizer = trainable.build_optimizer(model, cfg)  # AdamW (or 8-bit) over the trainable weights only
    n_params, n_trained = sharding.count_parameters(model), sharding.count_parameters(model, trainable_only=True)
    sharding.configure_deepspeed(accelerator, cfg, say)  # micro-batch, accumulation, clipping: ours, not DeepSpeed's
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable.keep_trainable_only(accelerator, cfg)  # checkpoints of LoRA/frozen runs skip the frozen base
    forward = speed.CompiledForward(model, compile_on, lambda m: say(m, to_bar=True))
    say(f"attention {accelerator.unwrap_model(model).config._attn_implementation}, "
        f"torch_compile {'on' if compile_on else 'off'}, gradient checkpointing {cfg.gradient_checkpointing}, "
        f"precision {accelerator.mixed_precision}")

    # ---- resume or start ----------------------------------------------------------------------
    # Files in checkpoint_dir are written once, by the main process; with several machines it must be
    # one shared folder, which every process checks before reading a checkpoint from it.
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    checkpoint.check_shared(accelerator, out)
    state = run.fresh_state(cfg)
    # The newest readable checkpoint (unreadable ones are named and skipped); another run's is refused.
    resumed_from, saved = checkpoint.resume(accelerator, out, say, accept=lambda s: run.resume_state(s, cfg, say))
    checkpoint.agree_on_resume(accelerator, resumed_from)  # every process from the same one, or all from none
    if resumed_from is not None:
        state = saved
        bad.load_state_dict(state["bad"])
        if state["step"] >= cfg.max_steps and (out / "config.json").is_file():  # rerun of a finished run
            say(f"this run is finished: {resumed_from.name} is at max_steps {cfg.max_steps} and the final model is in "
                f"{out}; nothing to do. Raise max_steps to train on, or set a new checkpoint_name for a new run.")
            accelerator.end_training()
            return 0
        say(f"resumed from {resumed_from} at step {state['step']}")
    if accelerator.is_main_process:
        checkpoint.check_disk(out, n_params, cfg.save_total_limit, say, trained=n_trained)
        (out / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    accelerator.wait_for_everyone()

    start_trackers(accelerator, cfg.public_dict(), resume_step=state["step"] if resumed_from else None)
    log = MetricsLog(out, accelerator, resume_step=state["step"] if resumed_from else None)
    micro_per_step = cfg.gradient_accumulation_steps
    train_iter = batches.train_batches(train_records, prepare, train_collate, cfg, rank, world, start_step=state["step"])
    if resumed_from is not None and hasattr(train_iter, "load_state_dict"):
        train_iter.load_state_dict(checkpoint.read_process_state(resumed_from, rank))
    eval_loaders = {name: batches.eval_loader(records, prepare, collate, cfg, rank, world)
                    for name, records in eval_sets.items()}
    gen_kwargs = {**generate_kwargs(accelerator.unwrap_model(model), cfg.generation_max_length),
                  **speed.generation_speedups(compile_on)} if cfg.predict_with_generate else None
    stopper = stopping.GracefulStop(accelerator)
    nan_steps = stopping.injected_nan_steps()
    shift_right = decoder_inputs(accelerator.unwrap_model(model).config)

    named_eval_bad: set[str] = set()

    def do_eval(step: int) -> None:
        metrics = {}
        for i, (name, loader) in enumerate(eval_loaders.items()):
            got, rows, eval_bad = evaluate(model, loader, processor.tokenizer, accelerator,
                                           generate_kwargs=gen_kwargs, should_stop=stopper.requested)
            if stopper.agreed():  # abandoned half-way: evaluate again after the resume
                state["pending_eval"] = True
                save(step)
                raise stopping.RunStopped(f"stopped by signal during the evaluation at step {step}; checkpoint "
                                          "saved. Rerun the same command to resume.")
            got["eval_bad_samples"] = len(eval_bad)
            if eval_bad and name not in named_eval_bad:  # the same samples fail at every evaluation: name them once
                say(f"evaluation{'' if len(eval_loaders) == 1 else ' set ' + name} skipped {len(eval_bad)} unusable "
                    f"samples: {batches.reasons(eval_bad)}; first: "
                    + "; ".join(f"{b.id} ({b.reason}{', ' + b.detail if b.detail else ''})" for b in eval_bad[:5]),
                    to_bar=True)
                named_eval_bad.add(name)
            if i == 0:  # the first set keeps the plain eval_* keys: it picks the best model, scripts read them
                metrics.update(got)
            if cfg.eval_sets:  # each named set as eval/<name>/<metric>
                metrics.update(run.set_metrics(name, got))
            log.text(step, f"eval/{name}/samples" if cfg.eval_sets else "eval/samples", run.samples_table(rows[:8]))
        state["pending_eval"] = False
        log.log(step, metrics)
        if step == 0:
            state["base_metrics"] = metrics
        value = metrics.get("eval_" + cfg.metric_for_best_model)
        if step > 0 and run.improves(value, state["best_metric"], cfg.greater_is_better):  # step 0 is the base model
            state["best_metric"], state["best_step"] = value, step
        say(f"step {step}: " + run.eval_summary(metrics, list(eval_loaders) if cfg.eval_sets else None))

    def save(step: int) -> None:
        state["bad"] = bad.state_dict()
        path = checkpoint.save(accelerator, out, step, state,
                               process_state=train_iter.state_dict() if hasattr(train_iter, "state_dict") else None)
        if accelerator.is_main_process:
            best = out / f"checkpoint-{state['best_step']}" if state["best_step"] is not None else None
            checkpoint.prune(out, cfg.save_total_limit, keep={best, resumed_from})
        say(f"saved {path}", to_bar=True)

    stopper.on_stop = lambda: save(state["step"])

    # ---- train --------------------------------------------------------------------------------
    if cfg.eval_strategy == "steps" and ((cfg.eval_at_start and state["step"] == 0 and not resumed_from)
                                         or state.get("pending_eval")):
        do_eval(state["step"])
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
               desc="training", dynamic_ncols=True, file=run.bar_file(),
               mininterval=1 if sys.stderr.isatty() else 60)  # a log file gets a line a minute, not a flood
    window = run.Window()
    throughput = speed.Throughput(accelerator.unwrap_model(model).config, world)
    while state["step"] < cfg.max_steps:
        step = state["step"]
        lr = lr_at(step, peak=cfg.learning_rate, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                   kind=cfg.lr_scheduler_type)
        set_lr(optimizer, lr)
        micro = [next(train_iter) for _ in range(micro_per_step)]
        # One all-reduce for what every process must agree on before the forward: label tokens of the
        # whole optimizer step (the loss is normalised by them, pitfall 7), samples, audio, bad samples.
        step_tokens, samples, seconds, n_bad, n_seen = batches.step_totals(micro, accelerator)
        if n_bad:  # rare: collect the bad samples of all processes so every process counts the same
            for b in batches.gather_bad(micro):
                bad.add(b)
                if bad.total <= 5:  # name the first few as they happen; all are summarised at the end
                    say(f"skipped {b.id}: {b.reason}{f' ({b.detail})' if b.detail else ''}", to_bar=True)
        bad.seen += n_seen
        loss_sum = torch.zeros((), device=accelerator.device)
        for mb in micro:
            with accelerator.accumulate(model):
                features, labels = batches.batch_or_placeholder(mb, model, accelerator.device)
                with accelerator.autocast():
                    # decoder inputs, not labels: with labels Whisper would compute a mean loss we discard
                    logits = forward(input_features=features, decoder_input_ids=shift_right(labels)).logits
                token_loss = token_loss_sum(logits, labels)
                if step + 1 in nan_steps:
                    token_loss = token_loss * float("nan")
                # backward divides by the accumulation steps and DDP averages over processes: undo both.
                accelerator.backward(token_loss * world * micro_per_step / max(1, step_tokens))
                loss_sum += token_loss.detach()
        step_loss = float(accelerator.reduce(loss_sum, "sum")) / max(1, step_tokens)

        if math.isfinite(step_loss):
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) \
                if cfg.max_grad_norm > 0 else None
            optimizer.step()
            state["nonfinite_in_row"] = 0
        else:  # skip the update: one poisoned batch must not wipe out hours of training
            grad_norm = None
            state["nonfinite_in_row"] += 1
            state["nonfinite_steps"] += 1
            say(f"step {step + 1}: loss is {step_loss}; update skipped "
                f"({state['nonfinite_in_row']} in a row, limit {cfg.max_nonfinite_steps})", to_bar=True)
            if state["nonfinite_in_row"] >= cfg.max_nonfinite_steps:
                raise stopping.RunStopped(f"{cfg.max_nonfinite_steps} optimizer steps in a row had a NaN/inf loss; "
                                          "stopped without saving the poisoned state. Lower learning_rate, turn off fp16 "
                                          "(bf16 or fp32) or look for broken samples; the last checkpoint is intact.",
                                          EXIT_ERROR)
        optimizer.zero_grad(set_to_none=True)

        state["step"] = step = step + 1
        state["samples_seen"] += samples
        state["audio_seconds_seen"] += seconds
        window.add(step_loss, samples, step_tokens)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", **throughput.postfix(window),
                        refresh=False)  # drawn by update(), at most once a minute in a log file
        bar.update(1)

        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            log.log(step, {"loss": window.mean_loss(), "lr": lr, "grad_norm": None if grad_norm is None else
                           float(grad_norm), **throughput.metrics(window),
                           "epoch": state["samples_seen"] / len(train_records) if isinstance(train_records, list) else None,
                           "bad_samples": bad.total, "nonfinite_steps": state["nonfinite_steps"]})
            window = run.Window()
        stopping.check_bad_fraction(bad, cfg, say, on_stop=lambda: save(step))
        evaluated = cfg.eval_strategy == "steps" and (step % cfg.eval_steps == 0 or step == cfg.max_steps)
        if evaluated:
            do_eval(step)
        new_best = evaluated and state["best_step"] == step and cfg.load_best_model_at_end
        if step % cfg.save_steps == 0 or step == cfg.max_steps or new_best:
            save(step)
        stopper.check(step)
        if step == cfg.stop_at_step and step < cfg.max_steps:
            if step % cfg.save_steps:
                save(step)
            say(f"stop_at_step {step} reached; checkpoint saved. Rerun the same command without it to go on.")
            return 0
    bar.close()

    # ---- the model out ------------------------------------------------------------------------
    final_step = state["step"]
    if cfg.load_best_model_at_end and state["best_step"] is not None and state["best_step"] != final_step:
        accelerator.load_state(str(out / f"checkpoint-{state['best_step']}"))
        say(f"best {cfg.metric_for_best_model} {state['best_metric']:.2f} was at step {state['best_step']}; "
            "exporting that model")
    # FSDP and ZeRO-3 shard the weights: gather them whole, on every process (LoRA is refused with both)
    full = accelerator.get_state_dict(model) if sharding.is_sharded(accelerator) else None
    if accelerator.is_main_process:
        # LoRA merged into the base: a plain Whisper folder (the adapter beside it with lora_save_adapter)
        checkpoint.export_model(trainable.exportable(accelerator.unwrap_model(model), cfg, out), processor, out, full)
        worse = run.finish(cfg, lang, state, bad, out, say)
        log.log(final_step, {"bad_samples_by_reason": dict(bad.counts), "bad_samples": bad.total,
                             "samples_seen": state["samples_seen"], "worse_than_base": worse is not None,
                             **forward.stats()})
        if forward.active:
            say("torch_compile: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in forward.stats().items()))
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
