"""The element-wise work LoRA adds to a training step, counted (not timed) on CPU.

    python bench/lora_overhead.py                       # d_model 256, 2+2 layers, batch 2, LoRA r=8, bf16 autocast
    python bench/lora_overhead.py --d-model 384 --layers 4 --batch 4

Eager LoRA spends its extra time in element-wise kernels around each adapted Linear layer (casts, dropout,
scaling, the add), which on a GPU are bound by memory traffic. This script counts the bytes those operators
write in one forward and backward of a random Whisper (every ATen operator except matmuls, attention,
convolutions and views, through a TorchDispatchMode), for a full fine-tune and for LoRA as peft sets it up and
as whisper-ft does (trainable.add_lora with autocast, docs/DESIGN.md "LoRA's input casts"), with and without
dropout. Counts are exact and the same on every machine; what they cost in time depends on the card. CPU
autocast keeps layer norm outputs in bf16 where CUDA's keeps them in fp32, so on a GPU the casts of q/k/v/fc1
inputs remain (autocast's own) and the saving is in out_proj and fc2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Not element-wise: matmuls, attention, convolutions, and views that write nothing
SKIPPED = ("mm", "addmm", "bmm", "convolution", "convolution_backward", "detach", "t", "view", "_unsafe_view",
           "transpose", "permute", "expand", "slice", "select", "split", "unsqueeze", "squeeze", "as_strided",
           "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


def count(model, features, labels) -> tuple[int, int]:
    """(bytes written, operator calls) of the element-wise operators in one forward and backward."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        written = calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] not in SKIPPED:
                outs = out if isinstance(out, (tuple, list)) else [out]
                self.written += sum(o.numel() * o.element_size() for o in outs if isinstance(o, torch.Tensor))
                self.calls += 1
            return out

    with Counter() as c:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_features=features, decoder_input_ids=labels).logits
        logits.float().logsumexp(-1).sum().backward()
    return c.written, c.calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from whisper_ft.config import Config
    from whisper_ft.trainable import add_lora

    torch.set_num_threads(1)
    config = WhisperConfig(d_model=a.d_model, encoder_layers=a.layers, decoder_layers=a.layers,
                           encoder_attention_heads=a.d_model // 64, decoder_attention_heads=a.d_model // 64,
                           encoder_ffn_dim=4 * a.d_model, decoder_ffn_dim=4 * a.d_model, vocab_size=1000,
                           pad_token_id=999, bos_token_id=998, eos_token_id=998, decoder_start_token_id=997,
                           attn_implementation="sdpa")
    features = torch.randn(a.batch, config.num_mel_bins, 3000)
    labels = torch.randint(0, 997, (a.batch, 20))
    rows = [("full fine-tune (fp32 weights)", None, None)] + [
        (f"LoRA, {who}, lora_dropout {dropout}", autocast, dropout)
        for who, autocast in (("peft's input cast", False), ("whisper-ft (no input cast)", True))
        for dropout in (0.05, 0.0)]
    print(f"d_model {a.d_model}, {a.layers}+{a.layers} layers, batch {a.batch}, LoRA r={a.lora_r} on q/k/v/out_proj/"
          f"fc1/fc2, bf16 autocast on CPU; element-wise output bytes of one forward + backward\n")
    print("| model | MB written | x full fine-tune | operator calls |\n|---|---|---|---|")
    full = None
    for name, autocast, dropout in rows:
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config)
        if dropout is not None:  # a LoRA run under bf16 holds its frozen base in bf16 (trainable.base_dtype)
            model = add_lora(model.to(torch.bfloat16), Config(lora_r=a.lora_r, lora_dropout=dropout), autocast)
        written, calls = count(model.train(), features, labels)
        full = full or written
        print(f"| {name} | {written / 1e6:.0f} | {written / full:.2f} | {calls} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
