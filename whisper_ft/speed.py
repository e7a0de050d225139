"""What makes training and evaluation fast, and what shows whether they are: torch.compile with an eager
fallback, gradient checkpointing of all layers or the encoder alone, the attention implementation, and the
throughput accounting (estimated MFU, peak GPU memory, recompilations) that the loop logs.

Everything CUDA-only is guarded here, so that the loop reads the same on CPU and on a GPU.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any, Callable

import torch

# Dense bf16 (= fp16) tensor-core peak, TFLOPS, by a fragment of torch.cuda.get_device_name(). First match wins,
# so the more specific names come first. Sparse figures (2x) are not used: training is dense.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
               ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("A6000", 155.0),
               ("V100", 125.0), ("T4", 65.0))
ENCODER_FRAMES = 1500  # Whisper's encoder always sees 30 s of audio: 3000 mel frames, 1500 after the stride-2 conv


def compile_wanted(setting: str) -> bool:
    """torch_compile: auto = on where CUDA is present (on CPU compiling costs more than it saves), true, false."""
    return setting == "true" or (setting == "auto" and torch.cuda.is_available())


def attention_implementation(mixed_precision: str) -> str:
    """The fastest attention the card and the installed packages support (the loop logs which one runs).

    flash_attention_2 needs the flash_attn package, CUDA and half precision; otherwise PyTorch's
    scaled_dot_product_attention, which itself picks its flash or memory-efficient kernels on a GPU.
    """
    if torch.cuda.is_available() and mixed_precision in ("fp16", "bf16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def sdpa_choice(q, k, v) -> str | None:
    """The backend scaled_dot_product_attention picks for these inputs with none forced ("FLASH_ATTENTION",
    "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"). None if torch no longer says: _fused_sdp_choice is private.
    """
    from whisper_ft.compat import sdpa_backend_choice

    return sdpa_backend_choice(q, k, v)


def sdpa_kernel(model_config, device, mixed_precision: str) -> str | None:
    """sdpa_choice, lowercase, for the encoder's self-attention (frames x frames, most of the attention work) on
    this device and precision, with gradients: what the start-up line names."""
    heads = model_config.encoder_attention_heads
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    q = torch.empty(1, heads, model_config.max_source_positions, model_config.d_model // heads, device=device,
                    dtype=dtype, requires_grad=True)
    choice = sdpa_choice(q, q, q)
    return choice and choice.lower()


def load_fastest(load_whisper, cfg, lang, mixed_precision: str, say, dtype=None):
    """load_whisper with the fastest attention; if flash_attention_2 will not load, sdpa (said once)."""
    wanted = attention_implementation(mixed_precision)
    try:
        return load_whisper(cfg.whisper_pretrained, lang, cfg.task, cache_dir=cfg.model_cache, token=cfg.hf_token,
                            attn_implementation=wanted, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - a broken flash_attn install; a real load error raises again below
        if wanted == "sdpa":
            raise
        say(f"attention: {wanted} did not load ({str(e).splitlines()[0][:200]}); using sdpa")
        return load_whisper(cfg.whisper_pretrained, lang, cfg.task, cache_dir=cfg.model_cache, token=cfg.hf_token,
                            attn_implementation="sdpa", dtype=dtype)


def set_gradient_checkpointing(model, setting: str) -> None:
    """true: every encoder and decoder layer; encoder: encoder layers only; false: none.

    The encoder runs over 1500 frames, the decoder over at most 448 tokens (typically under 100), so the
    encoder holds most of the activations: checkpointing it alone frees most of the memory while the
    decoder layers are not recomputed. transformers sets a per-layer `gradient_checkpointing` flag; we
    enable it model-wide (which also installs the checkpoint function) and switch the decoder's off.
    """
    if setting == "false":
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers (5.24); the old name goes in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if setting == "encoder":
        for layer in model.model.decoder.layers:
            layer.gradient_checkpointing = False


class CompiledForward:
    """The model's forward under torch.compile, falling back to eager if compilation fails.

    Compilation happens lazily at the first call (and on a recompilation): if it raises, say so once and run
    that call and all later ones eagerly, so a missing compiler or an unsupported op costs speed, not the run.
    A genuine error (out of memory, a bad input) raises again from the eager call. The module itself is not
    replaced: checkpoints and the exported model keep their parameter names.
    """

    def __init__(self, model, enabled: bool, say: Callable[[str], None]):
        self.model, self.say = model, say
        self.compiled, self.graphs = None, None  # graphs compiled by the first call, and by later ones
        if enabled:
            # Label lengths are padded to a few buckets (collate.LABEL_BUCKETS) and batches to full size, so
            # static shapes compile a handful of graphs (DESIGN: recompiling on batch size).
            name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))  # older torch: cache_size_limit
            self.compiled = torch.compile(model, dynamic=False)

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, **inputs):
        if self.compiled is None:
            return self.model(**inputs)
        try:
            # counted around this call only: evaluation's decoder step (whisper_ft.greedy) compiles its own graphs
            before = _graphs()
            out = self.compiled(**inputs)
            after = _graphs()
            if before is not None and after is not None:  # unknown counts are left out, not reported as 0
                self.graphs = (after - before, 0) if self.graphs is None else \
                    (self.graphs[0], self.graphs[1] + after - before)
            return out
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure; the eager call below re-raises real errors
            self.compiled = None
            self.say(f"torch_compile: compilation failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                     "training continues eagerly (set torch_compile: false to skip the attempt)")
            return self.model(**inputs)

    def stats(self) -> dict[str, int]:
        """Graphs this forward compiled, and how many came after the first call: recompilations for a new
        label bucket or batch size. A count that keeps growing means shapes are not bucketed."""
        if self.graphs is None:
            return {}
        return {"compiled_graphs": sum(self.graphs), "recompiled_graphs": self.graphs[1]}


def _graphs() -> int | None:
    from whisper_ft.compat import compiled_graph_count

    return compiled_graph_count()


def generation_speedups(compile_on: bool) -> dict[str, Any]:
    """generate() kwargs for a static KV cache (fixed shapes) with a compiled decoder step on CUDA.

    Evaluation's own greedy loop (whisper_ft.greedy) reads it as "compile the step"; generate(), where that
    loop does not apply or fails, compiles its step itself on a GPU (its _valid_auto_compile_criteria) and runs
    the static cache eagerly on CPU. Greedy tokens are the same as with the dynamic cache (tests/test_speed.py).
    """
    return {"cache_implementation": "static"} if compile_on else {}


def device_peak_tflops() -> tuple[str, float | None]:
    """(card name, its dense bf16 peak in TFLOPS or None when unknown); ("cpu", None) without CUDA."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def training_flops_per_sample(config, decoder_tokens: float) -> float:
    """Model FLOPs of one training sample: 3 x forward (forward + backward), each matmul 2 x m x n x k.

    Counted per layer: the two convolutions over the 3000/1500 frames; per encoder layer the q/k/v/o
    projections (4 d^2) and MLP (2 d f) over 1500 frames and attention scores + values (2 x 1500^2 x d);
    per decoder layer self-attention projections and MLP over the T decoder tokens, cross-attention q/o over
    T and k/v over the 1500 frames, attention over T^2 and T x 1500; the output projection d x vocab over T.
    Recomputation by gradient checkpointing is not counted (MFU counts the model's work, not the card's).
    """
    d, f_e, f_d = config.d_model, config.encoder_ffn_dim, config.decoder_ffn_dim
    s, t, v = ENCODER_FRAMES, float(decoder_tokens), config.vocab_size
    conv = 2 * 3 * config.num_mel_bins * d * 2 * s + 2 * 3 * d * d * s
    encoder = config.encoder_layers * (2 * s * (4 * d * d + 2 * d * f_e) + 2 * 2 * s * s * d)
    decoder = config.decoder_layers * (2 * t * (4 * d * d + 2 * d * d + 2 * d * f_d) + 2 * s * 2 * d * d
                                       + 2 * 2 * t * t * d + 2 * 2 * t * s * d)
    head = 2 * t * d * v
    return 3.0 * (conv + encoder + decoder + head)


def mfu(samples_per_second: float, flops_per_sample: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in percent of the card's peak; None where the peak is unknown (CPU included)."""
    if not peak_tflops or samples_per_second <= 0:
        return None
    return 100.0 * samples_per_second * flops_per_sample / (peak_tflops * 1e12)


def peak_memory_gb() -> float | None:
    """Peak GPU memory allocated by tensors since the start (or the last reset), GiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


class Readback:
    """0-d tensors (or plain numbers, or None) read on the host later without making the host wait now.

    float() of a CUDA tensor waits for everything queued on the stream so far: a step's loss read that way after
    the next step was queued would wait for that whole step too. Here each value is copied into pinned host memory
    without blocking, right where it is made, and values() waits only for that copy (DESIGN: host syncs).
    """

    def __init__(self, *values):
        self._values, self.event = [], None
        for v in values:
            if hasattr(v, "full_tensor"):  # a DTensor (FSDP2's gradient norm)
                v = v.full_tensor()
            if torch.is_tensor(v) and v.is_cuda:
                v = torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v.detach(), non_blocking=True)
                self.event = self.event or torch.cuda.Event()
            self._values.append(v)
        if self.event is not None:
            self.event.record()  # after the copies: values() waits for them and what was queued before

    def values(self) -> list[float | None]:
        if self.event is not None:
            self.event.synchronize()
        return [None if v is None else float(v) for v in self._values]


class Window:
    """Loss and throughput (samples and label tokens of all processes) since the last log line, and the learning
    rate and gradient norm (None: not clipped, or the update was skipped) of its last step."""

    def __init__(self):
        self.start, self.losses, self.samples, self.tokens = time.perf_counter(), [], 0, 0
        self.lr: float | None = None
        self.grad_norm: float | None = None

    def add(self, loss: float, samples: int, tokens: int = 0, lr: float | None = None,
            grad_norm: float | None = None) -> None:
        self.losses.append(loss)
        self.samples += samples
        self.tokens += tokens
        self.lr, self.grad_norm = lr, grad_norm

    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))

    def samples_per_second(self) -> float:
        return self.samples / max(1e-9, time.perf_counter() - self.start)


class Throughput:
    """samples/s, estimated MFU and peak GPU memory of a Window, for metrics.jsonl and the progress bar.

    The window counts samples and label tokens of all processes; MFU is per card, so divided by the processes.
    Absent (None in metrics, left out of the bar) where it cannot be known: MFU without a known peak (CPU
    included), memory without CUDA.
    """

    def __init__(self, config, processes: int):
        self.config, self.processes = config, processes
        self.device, self.peak = device_peak_tflops()

    def metrics(self, window) -> dict[str, float | None]:
        sps = window.samples_per_second()
        per_sample = training_flops_per_sample(self.config, window.tokens / max(1, window.samples))
        return {"samples_per_second": sps, "mfu_percent": mfu(sps / self.processes, per_sample, self.peak),
                "peak_gpu_memory_gb": peak_memory_gb()}

    def postfix(self, window) -> dict[str, str]:
        m = self.metrics(window)
        out = {"sps": f"{m['samples_per_second']:.1f}"}
        if m["mfu_percent"] is not None:
            out["mfu"] = f"{m['mfu_percent']:.0f}%"
        if m["peak_gpu_memory_gb"] is not None:
            out["mem"] = f"{m['peak_gpu_memory_gb']:.1f}G"
        return out
