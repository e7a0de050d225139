"""Which attention kernel is fastest for Whisper's shapes on this card: PyTorch's SDPA backends, one at a time.

    python bench/bench_attention.py                            # whisper-small shapes, batch 32, bf16
    python bench/bench_attention.py --model large-v3 --batch 16 --dtype fp16
    python bench/bench_attention.py --frames 300 --batch 1 --dtype fp32 --json a.json   # the CPU check

whisper-ft runs attention through torch's scaled_dot_product_attention (attn_implementation "sdpa"), which
picks a backend per call. This times forward + backward of that call on random q/k/v of two shapes, the
encoder's self-attention (frames x frames) and the decoder's cross-attention (label tokens x frames), with
each backend forced in turn (torch.nn.attention.sdpa_kernel): flash, cuDNN, memory-efficient and math, and
with none forced ("default", which names the backend SDPA chose). A backend that cannot run the shape or
dtype here says so. Each output is compared with the math backend's in fp32 (max absolute difference), as a
faster kernel is only useful if it computes the same thing. TFLOP/s counts 4 x B x H x Sq x Sk x D for the
forward and 2.5x that for the backward (flash attention's convention: the backward recomputes the scores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

HEADS = {"tiny": 6, "base": 8, "small": 12, "medium": 16, "large-v3": 20}  # head dim 64 in every size
BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def measure(q, k, v, backend: str | None, iters: int, reference) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    cuda = q.is_cuda

    def step():
        out = sdpa(q, k, v)
        out.backward(grad)
        return out

    grad = torch.ones_like(q)
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
            out = step()  # warm-up, and the output compared
            for _ in range(2):
                step()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                step()
            if cuda:
                torch.cuda.synchronize()
    except RuntimeError as e:  # no kernel of this backend for the shape, dtype or device
        first = str(e).splitlines()[0]
        return {"error": "not available here" if "No viable backend" in first else first[:160]}
    b, h, sq, d = q.shape
    flops = 3.5 * 4 * b * h * sq * k.shape[2] * d
    ms = (time.perf_counter() - start) / iters * 1000
    return {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
            "max_abs_diff_vs_math": float((out.detach().float() - reference).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(HEADS), default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", type=int, default=1500, help="encoder positions (1500 for 30 s of audio)")
    p.add_argument("--tokens", type=int, default=64, help="decoder label width (a bucket the loop pads to)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from whisper_ft.speed import sdpa_choice

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a.dtype = a.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    heads = HEADS[a.model]
    gen = torch.Generator().manual_seed(0)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "model": a.model, "batch": a.batch, "heads": heads, "head_dim": 64, "dtype": a.dtype, "shapes": {}}
    for name, sq in (("encoder self-attention", a.frames), ("decoder cross-attention", a.tokens)):
        q, k, v = (torch.randn(a.batch, heads, n, 64, generator=gen).to(device, dtype).requires_grad_()
                   for n in (sq, a.frames, a.frames))
        with sdpa_kernel(SDPBackend.MATH):
            reference = torch.nn.functional.scaled_dot_product_attention(*(t.detach().float() for t in (q, k, v)))
        rows = {"default": {**measure(q, k, v, None, a.iters, reference), "chosen": sdpa_choice(q, k, v)}}
        for backend in BACKENDS:
            rows[backend.lower()] = measure(q, k, v, backend, a.iters, reference)
        result["shapes"][f"{name} ({sq} x {a.frames})"] = rows
    print(f"{result['device']}, torch {result['torch']}: whisper-{a.model} attention ({heads} heads x 64), batch "
          f"{a.batch}, {a.dtype}; forward + backward\n")
    print("| shape | backend | ms | TFLOP/s | max abs diff vs math (fp32) |\n|---|---|---|---|---|")
    for shape, rows in result["shapes"].items():
        for backend, r in rows.items():
            label = f"default ({r['chosen'] or '?'})" if backend == "default" else backend
            print(f"| {shape} | {label} | " + (f"{r['error']} | | |" if "error" in r else
                                               f"{r['ms']} | {r['tflops']} | {r['max_abs_diff_vs_math']:.2e} |"))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
