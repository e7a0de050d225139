"""Fine-tune Whisper on one language or domain.

    accelerate launch [--gpu_ids 1] train_loop.py --config config.yaml [--learning-rate 3e-5 ...]
    python train_loop.py --config config.yaml            # one process
    bash launch.sh [GPU_ID] [flags]                      # in the background, logging to train.log

Rerunning the same command resumes from the newest complete checkpoint in checkpoint_dir.
The whole run reads top to bottom: train() calls setup -> resume -> fit -> finish, and close() on every
exit; evaluate() and save() take the run. The pieces they call live in whisper_ft/.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whisper_ft.config import Config, ConfigError, config_warnings, dump_yaml, load_config, trackers
from whisper_ft.exit_codes import Exit


def main(argv: list[str] | None = None) -> int:
    from whisper_ft.reporting import survive_a_closed_stderr

    survive_a_closed_stderr()  # a launcher that dies first must not take the run's messages with it
    # Everything that can be checked without the model and data is checked first: a wrong GPU, token or
    # setting must stop the run in seconds, not after the model has loaded or a night has passed.
    try:
        cfg = load_config(argv, training=True)
        from whisper_ft import device
        on_cpu = device.choose(cfg)  # before anything touches CUDA
    except ConfigError as e:
        print(f"whisper-ft: the configuration has problems:\n{e}", file=sys.stderr)
        return Exit.CONFIG
    from whisper_ft import hub
    try:
        token_note = hub.check_token(cfg, offline=os.environ.get("HF_HUB_OFFLINE", "").upper() in
                                     ("1", "ON", "YES", "TRUE"))
    except hub.HubError as e:
        print(f"whisper-ft: {e}", file=sys.stderr)
        return Exit.CONFIG
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for note in ["warning: " + w for w in config_warnings(cfg)] + ([token_note] if token_note else []):
            print(f"whisper-ft: {note}", file=sys.stderr, flush=True)
    from whisper_ft.checkpoint import CheckpointError
    from whisper_ft.data import DataError
    from whisper_ft.model import ModelError
    from whisper_ft.outputs import check_training_output
    from whisper_ft.stopping import RunStopped

    try:  # a folder that is not ours, or holds an input, is refused before anything loads or is written
        check_training_output(cfg, argv)
    except CheckpointError as e:
        print(f"whisper-ft: {e}", file=sys.stderr)
        return Exit.CONFIG
    try:
        return train(cfg, on_cpu)
    except (DataError, ModelError, CheckpointError) as e:
        print(f"whisper-ft: {e}", file=sys.stderr)
        return Exit.ERROR
    except RunStopped as e:
        print(f"whisper-ft: {e}", file=sys.stderr)
        return e.exit_code


@dataclass
class Run:
    """What setup(), resume() and start() build and the rest of the run uses; `state` is what a checkpoint saves."""

    cfg: Config
    accelerator: Any
    say: Any  # reporting.Reporter: the main process's messages
    out: Path  # checkpoint_dir
    lang: Any = None
    processor: Any = None
    model: Any = None  # prepared by accelerate
    optimizer: Any = None
    prepare: Any = None  # data.Prepare: record -> model inputs
    forward: Any = None  # speed.CompiledForward
    compile_on: bool = False
    n_params: int = 0  # counted before FSDP/DeepSpeed shard the model
    n_trained: int = 0
    train_data: Any = None  # a record list, or a streamed Hub dataset
    eval_sets: dict[str, list] = field(default_factory=dict)
    state: Any = None  # state.RunState
    resumed_from: Path | None = None
    saved_step: int | None = None  # the step of the newest checkpoint, saved or resumed from
    # built once the run is known to go on: after resume()
    log: Any = None  # metrics_log.MetricsLog
    stream: Any = None  # the training stream (batches.train_batches)
    eval_loaders: dict[str, Any] = field(default_factory=dict)
    gen_kwargs: dict[str, Any] | None = None
    shift_right: Any = None  # labels -> decoder input ids
    stopper: Any = None  # stopping.GracefulStop
    bar: Any = None
    window: Any = None  # speed.Window: what the next log line reports
    pending: Any = None  # Queued: the last step, until settle() reads its loss back
    skips_on_device: bool = False  # a NaN/inf step is skipped without a read-back (trainable.skips_on_device)
    count_group: Any = None  # where several processes sum the step's counts on the host (batches.count_group)
    named_eval_bad: set[str] = field(default_factory=set)  # eval sets whose unusable samples were named
    endpoints: Any = None  # merge.Endpoints: the base model's trainable weights, for merge_base


def train(cfg: Config, on_cpu: bool = False) -> int:
    run = Run(cfg, make_accelerator(cfg, on_cpu), None, Path(cfg.checkpoint_dir))
    try:  # every exit, early or not, normal or by an exception, passes through close()
        setup(run)
        if resume(run):
            return Exit.OK  # a finished run, rerun: nothing to do
        start(run)
        fit(run)
        if run.state.step >= cfg.max_steps:  # else stopped at stop_at_step, checkpoint saved
            finish(run)
        return Exit.OK
    finally:
        close(run)


def make_accelerator(cfg: Config, on_cpu: bool):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from whisper_ft.device import mixed_precision

    return Accelerator(
        cpu=on_cpu,  # -g cpu: deliberately, whatever GPUs there are
        mixed_precision=mixed_precision(cfg, on_cpu),
        log_with=trackers(cfg) or None, project_dir=cfg.checkpoint_dir,  # report_to, through accelerate's trackers
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        # Each process reads its own shard; batches differ in shape, so nothing is dispatched
        # (DESIGN: dispatched batches).
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        # the LR is a pure function of the step (DESIGN: scheduler stepped per process)
        step_scheduler_with_optimizer=False,
    )


def setup(run: Run) -> None:
    """Model, data and optimizer, prepared for the processes."""
    from accelerate.utils import set_seed

    from whisper_ft import batches, compat, device, sharding, speed, trainable
    from whisper_ft.data import Prepare
    from whisper_ft.languages import resolve
    from whisper_ft.model import load_whisper
    from whisper_ft.reporting import Reporter

    cfg, accelerator = run.cfg, run.accelerator
    run.say = say = Reporter(accelerator)
    say(device.describe(accelerator))
    set_seed(cfg.seed)
    run.lang = resolve(cfg.lang)
    # fp32, or bf16 for a LoRA run's frozen base under bf16 (trainable.base_dtype); whole, even under ZeRO-3
    with sharding.whole_model_load(accelerator):
        run.processor, model = speed.load_fastest(load_whisper, cfg, run.lang, accelerator.mixed_precision, say,
                                                  dtype=trainable.base_dtype(cfg, accelerator.mixed_precision))
    model.config.use_cache = False  # caching is for generation; in training it only costs memory
    speed.set_gradient_checkpointing(model, cfg.gradient_checkpointing)  # non-reentrant: fine with frozen weights
    # SpecAugment, freeze_encoder, LoRA (without peft's input casts where autocast makes them redundant)
    model = trainable.setup_model(model, cfg, say, autocast=accelerator.native_amp)
    if cfg.merge_base:  # the base model's trainable weights, on the CPU: one end of the line merge_base searches
        from whisper_ft import merge
        why_not = merge.unavailable(cfg, sharding.is_sharded(accelerator))
        if why_not:
            say(f"warning: merge_base is off for this run: {why_not}; the trained weights are exported unmerged")
        else:
            run.endpoints = merge.Endpoints(model)
    run.compile_on = speed.compile_wanted(cfg.torch_compile)
    run.prepare = Prepare(run.processor.feature_extractor, run.processor.tokenizer,
                          timestamp_probability=cfg.timestamp_probability, seed=cfg.seed)

    run.train_data, eval_records = batches.load_data(cfg, run.lang, run.prepare, say)
    run.eval_sets = batches.load_eval_sets(cfg, run.lang, run.prepare, say, eval_records,
                                           run.train_data)  # {"eval": ...} by default

    # Groups and counts come from the whole model, before FSDP/DeepSpeed shard it in prepare.
    optimizer = trainable.build_optimizer(model, cfg)  # AdamW (or 8-bit) over the trainable weights only
    run.n_params = sharding.count_parameters(model)
    run.n_trained = sharding.count_parameters(model, trainable_only=True)
    sharding.configure_deepspeed(accelerator, cfg, say)  # micro-batch, accumulation, clipping: ours, not DeepSpeed's
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    trainable.keep_trainable_only(accelerator, cfg)  # checkpoints of LoRA/frozen runs skip the frozen base
    run.skips_on_device = trainable.skips_on_device(run.optimizer, accelerator)
    run.count_group = batches.count_group(accelerator)
    run.forward = speed.CompiledForward(run.model, run.compile_on, lambda m: say(m, to_bar=True))
    config = accelerator.unwrap_model(run.model).config
    attention = compat.attention_implementation(config)
    kernel = speed.sdpa_kernel(config, accelerator.device, accelerator.mixed_precision) if attention == "sdpa" else None
    say(f"attention {attention}{f' ({kernel} kernel)' if kernel else ''}, "
        f"torch_compile {'on' if run.compile_on else 'off'}, gradient checkpointing {cfg.gradient_checkpointing}")


def resume(run: Run) -> bool:
    """The run state: the newest readable checkpoint's, or a fresh one. True when the run is already finished."""
    from whisper_ft import checkpoint, outputs
    from whisper_ft.state import RunState, resume_state

    cfg, accelerator, out, say = run.cfg, run.accelerator, run.out, run.say
    # Files in checkpoint_dir are written once, by the main process; with several machines it must be
    # one shared folder, which every process checks before reading a checkpoint from it.
    if accelerator.is_main_process:
        outputs.claim(out)  # the folder and the marker that makes it recognisably a run of this tool
    accelerator.wait_for_everyone()
    checkpoint.check_shared(accelerator, out)
    run.state = RunState.fresh(cfg)
    # The newest readable checkpoint (unreadable ones are named and skipped); another run's is refused.
    run.resumed_from, saved = checkpoint.resume(accelerator, out, say, accept=lambda s: resume_state(s, cfg, say))
    checkpoint.agree_on_resume(accelerator, run.resumed_from)  # every process from the same one, or all from none
    if run.resumed_from is not None:
        run.state, run.saved_step = saved, saved.step
        if run.state.step >= cfg.max_steps and (out / "config.json").is_file():  # rerun of a finished run
            say(f"this run is finished: {run.resumed_from.name} is at max_steps {cfg.max_steps} and the final model "
                f"is in {out}; nothing to do. Raise max_steps to train on, or set a new checkpoint_name for a new run.")
            return True
        if cfg.stop_at_step and cfg.stop_at_step <= run.state.step < cfg.max_steps:  # a time-limited job rerun
            say(f"stop_at_step {cfg.stop_at_step} was already reached: {run.resumed_from.name} is at step "
                f"{run.state.step}; nothing to do. Raise stop_at_step or remove it to train on.")
            return True
        say(f"resumed from {run.resumed_from} at step {run.state.step}")
        if checkpoint.kept_note(out):
            say(checkpoint.kept_note(out))
    # every process checks (one shared folder, the same answer), so a refusal stops them all, none left waiting
    checkpoint.check_disk(out, run.n_params, cfg.save_total_limit, say, trained=run.n_trained)
    if accelerator.is_main_process:
        try:
            (out / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        except OSError as e:
            raise checkpoint.CheckpointError(f"cannot write {out / 'config.yaml'}: {e.strerror or e}; "
                                             f"{outputs.free_space(out)}") from None
    accelerator.wait_for_everyone()
    return False


def start(run: Run) -> None:
    """Trackers, metrics.jsonl, the training stream at the run's position, the eval loaders, the signal handler."""
    from whisper_ft import batches, checkpoint, speed, stopping
    from whisper_ft.collate import Collator, decoder_inputs
    from whisper_ft.metrics_log import MetricsLog, start_trackers
    from whisper_ft.model import generate_kwargs

    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    resume_step = state.step if run.resumed_from else None
    start_trackers(accelerator, cfg.public_dict(), resume_step=resume_step)
    run.log = MetricsLog(run.out, accelerator, resume_step=resume_step)
    rank, world = accelerator.process_index, accelerator.num_processes
    start_token = accelerator.unwrap_model(run.model).config.decoder_start_token_id
    # A compiled forward gets label widths from a few buckets and full batches, so new transcript lengths and
    # short batches do not recompile it.
    collate = Collator(start_token, bucket=run.compile_on, rows=cfg.per_device_train_batch_size if run.compile_on else 0)
    run.stream = batches.train_batches(run.train_data, run.prepare, collate, cfg, rank, world, start_step=state.step)
    if run.resumed_from is not None:  # a streamed shard's exact position; a record list's follows from the step
        run.stream.load_state_dict(checkpoint.read_process_state(run.resumed_from, rank))
    run.eval_loaders = {name: batches.eval_loader(records, run.prepare, Collator(start_token), cfg, rank, world)
                        for name, records in run.eval_sets.items()}
    run.gen_kwargs = {**generate_kwargs(accelerator.unwrap_model(run.model), cfg.generation_max_length),
                      **speed.generation_speedups(run.compile_on)} if cfg.predict_with_generate else None
    run.shift_right = decoder_inputs(accelerator.unwrap_model(run.model).config)
    run.stopper = stopping.GracefulStop(accelerator)
    run.stopper.on_stop = lambda: save(run, run.state.step)


def fit(run: Run) -> None:
    """Optimizer steps up to max_steps (or stop_at_step), logging, evaluating and saving on the way."""
    from whisper_ft import speed, stopping
    from whisper_ft.reporting import progress_bar

    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    if cfg.eval_strategy == "steps" and ((cfg.eval_at_start and state.step == 0 and not run.resumed_from)
                                         or state.pending_eval):
        evaluate(run, state.step)
    run.model.train()
    run.bar = progress_bar(cfg.max_steps, state.step, accelerator.is_main_process)
    run.window = speed.Window()
    throughput = speed.Throughput(accelerator.unwrap_model(run.model).config, accelerator.num_processes)
    faults = {fault: stopping.injected_steps(fault) for fault in ("NAN", "SIGTERM")}
    while state.step < cfg.max_steps:
        # where a step given up by a stop signal resumes (a streamed shard's position changes during the step)
        position = run.stream.state_dict() if run.stopper.drops_steps else None
        try:
            queued = train_step(run, {fault for fault, steps in faults.items() if state.step + 1 in steps})
        except stopping.StepDropped:
            if run.saved_step != state.step:
                save(run, state.step, position)
            raise stopping.RunStopped(f"stopped by signal at step {state.step} (step {state.step + 1} was dropped); "
                                      "checkpoint saved. Rerun the same command to resume.")
        state.step = step = state.step + 1
        settle(run)  # the step before: its loss is read back while this one runs on the GPU (DESIGN: host syncs)
        run.pending = queued
        logged = step % cfg.logging_steps == 0 or step == cfg.max_steps
        if logged:
            settle(run)
        window = run.window
        if window.losses:
            run.bar.set_postfix(loss=f"{window.losses[-1]:.3f}", lr=f"{window.lr:.2e}", **throughput.postfix(window),
                                refresh=False)  # drawn by update(), at most once a minute in a log file
        run.bar.update(1)

        if logged:
            run.log.log(step, {"loss": window.mean_loss(), "lr": window.lr, "grad_norm": window.grad_norm,
                               **throughput.metrics(window), "epoch": run.stream.epochs(state.samples_seen),
                               "bad_samples": state.bad.total, "nonfinite_steps": state.nonfinite_steps})
            run.window = speed.Window()
        stopping.check_bad_fraction(state.bad, cfg, run.say, on_stop=lambda: save(run, step))
        evaluated = cfg.eval_strategy == "steps" and (step % cfg.eval_steps == 0 or step == cfg.max_steps)
        if evaluated:
            evaluate(run, step)
        new_best = evaluated and state.best_step == step and cfg.load_best_model_at_end
        if step % cfg.save_steps == 0 or step == cfg.max_steps or new_best:
            save(run, step)
        run.stopper.check(step, queued.stop)
        if step == cfg.stop_at_step and step < cfg.max_steps:
            if step % cfg.save_steps:
                save(run, step)
            run.say(f"stop_at_step {step} reached; checkpoint saved. Rerun the same command without it to go on.")
            return


@dataclass
class Queued:
    """An optimizer step queued on the device; its loss and gradient norm are on their way back until settle()."""

    step: int
    loss_and_norm: Any  # speed.Readback of the summed token loss of all processes and the gradient norm (or None)
    tokens: int  # label tokens of all processes: the loss is their mean
    samples: int
    lr: float
    stop: bool  # a process had been signalled when the step began: save and stop after it


def train_step(run: Run, inject: set[str]) -> Queued:
    """Queue one optimizer step over gradient_accumulation_steps micro-batches, reading nothing back.

    A NaN/inf loss or gradient norm skips the update: one poisoned batch must not wipe out hours of training.
    The optimizer skips it on the device where it can (trainable.step_unless_nonfinite); settle() counts it
    afterwards.
    """
    import torch

    from whisper_ft import batches, speed, trainable
    from whisper_ft.evaluation import token_loss_sum
    from whisper_ft.schedule import lr_at, set_lr

    cfg, accelerator, model, state = run.cfg, run.accelerator, run.model, run.state
    world, micro_per_step = accelerator.num_processes, cfg.gradient_accumulation_steps
    lr = lr_at(state.step, peak=cfg.learning_rate, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
               kind=cfg.lr_scheduler_type)
    set_lr(run.optimizer, lr)
    micro = [next(run.stream) for _ in range(micro_per_step)]
    # From here to the update a stop signal gives the step up rather than finish it (one process: StepDropped).
    # Not during the fetch: an exception there cuts a worker's batch hand-over short, and the worker prints it.
    with run.stopper.droppable(enabled=state.step > 0):
        # What every process must agree on before the forward: label tokens of the whole optimizer step (the loss
        # is normalised by them, DESIGN: loss normalisation), samples, audio, bad samples, a stop signal anywhere.
        step_tokens, samples, seconds, n_bad, n_seen, stop = batches.step_totals(
            micro, accelerator, run.stopper.requested(), run.count_group)
        loss_sum = torch.zeros((), device=accelerator.device)
        for mb in micro:
            with accelerator.accumulate(model):
                features, labels = batches.batch_or_placeholder(mb, model, accelerator.device)
                with accelerator.autocast():
                    # decoder inputs, not labels: with labels Whisper would compute a mean loss we discard
                    logits = run.forward(input_features=features, decoder_input_ids=run.shift_right(labels)).logits
                token_loss = token_loss_sum(logits, labels)
                if "NAN" in inject:
                    token_loss = token_loss * float("nan")
                # backward divides by the accumulation steps and DDP averages over processes: undo both.
                accelerator.backward(token_loss * world * micro_per_step / max(1, step_tokens))
                loss_sum += token_loss.detach()
                if "SIGTERM" in inject:
                    os.kill(os.getpid(), signal.SIGTERM)
    if n_bad:  # rare: collect the bad samples of all processes so every process counts the same
        for b in batches.gather_bad(micro):
            state.bad.add(b)
            if state.bad.total <= 5:  # name the first few as they happen; all are summarised at the end
                run.say(f"skipped {b.named()}", to_bar=True)
    state.bad.seen += n_seen
    loss_sum = accelerator.reduce(loss_sum, "sum")
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    trainable.step_unless_nonfinite(run.optimizer, loss_sum, grad_norm, on_device=run.skips_on_device)
    run.optimizer.zero_grad(set_to_none=True)
    state.samples_seen += samples
    state.audio_seconds_seen += seconds
    return Queued(state.step + 1, speed.Readback(loss_sum, grad_norm), step_tokens, samples, lr, stop)


def settle(run: Run) -> None:
    """Read back the queued step's loss and gradient norm: the log window's numbers and the NaN/inf count.

    Called for the step before while the next one runs, and before anything that logs, evaluates or saves.
    """
    from whisper_ft import stopping, trainable

    queued, run.pending = run.pending, None
    if queued is None:
        return
    cfg, state = run.cfg, run.state
    loss_sum, norm = queued.loss_and_norm.values()
    loss = loss_sum / max(1, queued.tokens)
    if trainable.finite(loss, norm):
        state.nonfinite_in_row = 0
    else:
        state.nonfinite_in_row += 1
        state.nonfinite_steps += 1
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        run.say(f"step {queued.step}: {what}; update skipped "
                f"({state.nonfinite_in_row} in a row, limit {cfg.max_nonfinite_steps})", to_bar=True)
        norm = None
        if state.nonfinite_in_row >= cfg.max_nonfinite_steps:
            raise stopping.RunStopped(f"{cfg.max_nonfinite_steps} optimizer steps in a row had a NaN/inf loss or "
                                      "gradient norm; stopped without saving the poisoned state. Lower learning_rate, "
                                      "turn off fp16 (bf16 or fp32) or look for broken samples; the last checkpoint "
                                      "is intact.", Exit.ERROR)
    run.window.add(loss, queued.samples, queued.tokens, lr=queued.lr, grad_norm=norm)


def evaluate(run: Run, step: int) -> None:
    """Every eval set at `step`: metrics.jsonl, the best model so far, and the base model's numbers at step 0."""
    from whisper_ft import stopping
    from whisper_ft.metrics_log import eval_summary
    from whisper_ft.state import improves

    cfg, state = run.cfg, run.state
    metrics = evaluate_sets(run, step)
    if metrics is None:  # abandoned half-way: evaluate again after the resume
        state.pending_eval = True
        save(run, step)
        raise stopping.RunStopped(f"stopped by signal during the evaluation at step {step}; checkpoint "
                                  "saved. Rerun the same command to resume.")
    state.pending_eval = False
    run.log.log(step, metrics)
    if step == 0:
        state.base_metrics = metrics
    value = metrics.get("eval_" + cfg.metric_for_best_model)
    if step > 0 and improves(value, state.best_metric, cfg.greater_is_better):  # step 0 is the base model
        state.best_metric, state.best_step = value, step
    run.say(f"step {step}: " + eval_summary(metrics, list(run.eval_loaders) if cfg.eval_sets else None))


def evaluate_sets(run: Run, step: int) -> dict[str, Any] | None:
    """The metrics of the model as it is on every eval set (eval_* for the first, eval/<name>/* for named sets),
    or None when a stop signal cut the evaluation short."""
    from whisper_ft.data import describe
    from whisper_ft.evaluation import evaluate as evaluate_set
    from whisper_ft.metrics_log import samples_table, set_metrics

    cfg = run.cfg
    settle(run)
    metrics = {}
    for i, (name, loader) in enumerate(run.eval_loaders.items()):
        got, rows, eval_bad = evaluate_set(run.model, loader, run.processor.tokenizer, run.accelerator,
                                           generate_kwargs=run.gen_kwargs, should_stop=run.stopper.requested)
        if run.stopper.agreed():
            return None
        if not rows:  # no metrics for a set with nothing evaluated: a loss of 0.00 on 0 samples is not a result
            unusable = (f"evaluation set {name} is unusable: none of its samples could be evaluated"
                        f"{' (' + describe(eval_bad, 3, detail=True) + ')' if eval_bad else ''}")
            if i == 0:  # the set that picks the best model: nothing to pick by
                from whisper_ft.data import DataError
                if step > 0:
                    save(run, step)
                raise DataError(f"{unusable}; it is the set that picks the best model, so the run stops here"
                                f"{' (checkpoint saved)' if step > 0 else ''}. Fix its audio and transcripts, or "
                                "choose another eval_split / eval_sets")
            if name not in run.named_eval_bad:
                run.say(f"{unusable}; no metrics are written for it", to_bar=True)
                run.named_eval_bad.add(name)
            continue
        got["eval_bad_samples"] = len(eval_bad)
        if eval_bad and name not in run.named_eval_bad:  # the same samples fail at every evaluation: name them once
            run.say(f"evaluation{'' if len(run.eval_loaders) == 1 else ' set ' + name} skipped {len(eval_bad)} "
                    f"unusable samples: {describe(eval_bad, 5, detail=True)}", to_bar=True)
            run.named_eval_bad.add(name)
        if i == 0:  # the first set keeps the plain eval_* keys: it picks the best model, scripts read them
            metrics.update(got)
        if cfg.eval_sets:  # each named set as eval/<name>/<metric>
            metrics.update(set_metrics(name, got))
        run.log.text(step, f"eval/{name}/samples" if cfg.eval_sets else "eval/samples", samples_table(rows[:8]))
    return metrics


def save(run: Run, step: int, position: dict | None = None) -> None:
    """checkpoint-<step> with the run state and this process's data position (`position`: a dropped step's start,
    not the stream's current one); older ones pruned."""
    from whisper_ft import checkpoint

    settle(run)  # the state saved includes the last step's NaN/inf count
    position = run.stream.state_dict() if position is None else position
    path = checkpoint.save(run.accelerator, run.out, step, run.state.to_dict(), process_state=position)
    run.saved_step = step
    if run.accelerator.is_main_process:
        best = run.out / f"checkpoint-{run.state.best_step}" if run.state.best_step is not None else None
        checkpoint.prune(run.out, run.cfg.save_total_limit, keep={best, run.resumed_from})
    run.say(f"saved {path}", to_bar=True)


def finish(run: Run) -> None:
    """The model out: the best (or last) weights exported as a plain Whisper folder, model card, upload, summary."""
    from whisper_ft import checkpoint, hub, sharding, trainable

    cfg, accelerator, state, out = run.cfg, run.accelerator, run.state, run.out
    run.bar.close()
    if cfg.load_best_model_at_end and state.best_step is not None and state.best_step != state.step:
        accelerator.load_state(str(out / f"checkpoint-{state.best_step}"))
        run.say(f"best {cfg.metric_for_best_model} {state.best_metric:.2f} was at step {state.best_step}; "
                "exporting that model")
    if run.endpoints is not None:  # merge_base, where it can run
        merge_with_base(run)
    # FSDP and ZeRO-3 shard the weights: gather them whole, on every process (LoRA is refused with both)
    full = accelerator.get_state_dict(run.model) if sharding.is_sharded(accelerator) else None
    if accelerator.is_main_process:
        # LoRA merged into the base: a plain Whisper folder (the adapter beside it with lora_save_adapter)
        model = trainable.exportable(accelerator.unwrap_model(run.model), cfg, out, run.lang)
        checkpoint.export_model(model, run.processor, out, full)
        worse = hub.publish(cfg, run.lang, state, out, run.say)
        run.log.log(state.step, {"bad_samples_by_reason": dict(state.bad.counts), "bad_samples": state.bad.total,
                                 "samples_seen": state.samples_seen, "worse_than_base": worse is not None,
                                 **run.forward.stats()})
        if run.forward.active:
            run.say("torch_compile: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in run.forward.stats().items()))
    accelerator.wait_for_everyone()


def merge_with_base(run: Run) -> None:
    """merge_base: every alpha of merge.ALPHAS evaluated on every eval set, the one merge.choose() picks left in
    the model for export, and the table in metrics.jsonl (a row at the last step with merge_alpha) and the log."""
    from whisper_ft import merge, stopping

    cfg, state, step = run.cfg, run.state, run.state.step
    key = cfg.metric_for_best_model
    names = list(run.eval_loaders)

    def per_set(metrics: dict[str, Any]) -> dict[str, float]:
        if not cfg.eval_sets:
            return {names[0]: metrics.get("eval_" + key)}
        return {name: metrics.get(f"eval/{name}/{key}") for name in names}

    model = run.accelerator.unwrap_model(run.model)
    run.model.eval()
    table, evaluated = {}, {}
    for alpha in merge.ALPHAS:
        run.endpoints.set_alpha(model, alpha)
        metrics = evaluate_sets(run, step)
        if metrics is None:  # the checkpoint at max_steps is intact: the rerun merges again
            raise stopping.RunStopped("stopped by signal while merging with the base model; nothing was exported. "
                                      "Rerun the same command to merge and export.")
        table[alpha], evaluated[alpha] = per_set(metrics), metrics
        run.say(f"merge_base: alpha {alpha:g}: " + ", ".join(f"{n} {v:.2f}" for n, v in table[alpha].items()),
                to_bar=True)
    base = per_set(state.base_metrics) if state.base_metrics else {}
    alpha, why = merge.choose(table, base if None not in base.values() else {}, names[0], cfg.merge_domain_weight,
                              cfg.merge_max_wer_increase, cfg.greater_is_better)
    run.endpoints.set_alpha(model, alpha)
    chosen = state.base_metrics if alpha == 0 else evaluated[alpha]
    run.log.log(step, {**chosen, "merge_alpha": alpha, "merge_reason": why, "merge_metric": key,
                       "merge_table": merge.table_rows(table, base)})
    run.say(f"merge_base: exporting {why}")


def close(run: Run) -> None:
    """Every exit passes here: the progress bar, the TensorBoard writer, the trackers and the process group."""
    if run.bar is not None:
        run.bar.close()
    if run.stream is not None:
        run.stream.close()  # its data workers, now: they ignore the SIGTERM Python's exit would end them with
    if run.log is not None:
        run.log.close()
    if run.accelerator.num_processes > 1:
        # Give gloo's worker threads the GIL to finish dropping the last collective's tensors: the process
        # group may next be destroyed with the GIL held, and that waits for them (DESIGN: process group teardown).
        time.sleep(0.2)
    run.accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
