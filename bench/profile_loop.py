"""Where the time of a training step goes: the real loop (train_loop.py) under torch.profiler for a few steps.

    python bench/profile_loop.py --steps 16-20 --out profile -- --config config.yaml --max-steps 20 \\
        --checkpoint-dir /tmp/profiled-run

Everything after `--` is train_loop.py's own command line; give it a throwaway --checkpoint-dir, as the run
saves and resumes as usual. The profiler starts once the device has finished step FIRST-1 and stops once it has
finished step LAST, so the window holds exactly those steps (the loop's overlap of one step's read-back with
the next step is lost at the two edges only). It writes OUT/profile.md and OUT/profile.json:

- wall time per step and, on a GPU, how much of it the device was busy (kernel time / wall time): a low share
  means the host, the data loader or a read-back keeps the card waiting;
- kernels per step and device time per category (matmul, attention, convolution, fused by torch.compile,
  other element-wise, optimizer and clipping, copies), and the kernels that take the most time.

On CPU the table is built from the ATen operators' own CPU time instead: a check of the script, not a guide
to the GPU. bench/bench_gpu.py --profile DIR runs this for its "ours" row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# First match wins, on the lowercased kernel (GPU) or operator (CPU) name. Triton kernels first: torch.compile
# names them after the ops they fuse ("triton_poi_fused_convolution_backward_0"). Attention before matmul and
# convolution, as cuDNN's attention kernels are named "..._flash_fprop_wgmma..."; convolution before matmul
# for cuDNN's implicit-GEMM convolutions.
CATEGORIES = (
    ("fused by torch.compile", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer and clipping", ("adam", "multi_tensor", "foreach", "linalg_vector_norm")),
    ("copies and fills", ("memcpy", "memset", "aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zero_")),
)
OTHER = "other element-wise and reductions"


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), OTHER)


def summarise(timings: list[tuple[str, float]], steps: int, wall_s: float, on_gpu: bool, top: int = 25) -> dict:
    """(name, microseconds) of every kernel (GPU) or operator's own time (CPU) -> per-step totals by category
    and by name. On a GPU, busy_percent is kernel time over wall time: right for one stream, whose kernels do
    not overlap (several streams, e.g. DDP's communication, can add up to more than 100%)."""
    time_of, calls_of, by_category = Counter(), Counter(), Counter()
    for name, us in timings:
        time_of[name] += us
        calls_of[name] += 1
        by_category[category(name)] += us
    total = sum(time_of.values())

    def ms(us: float) -> float:
        return round(us / steps / 1000, 3)

    def percent(us: float) -> float:
        return round(100 * us / total, 1) if total else 0.0

    return {
        "steps": steps, "wall_ms_per_step": round(wall_s * 1000 / steps, 3),
        "timed": "device kernels" if on_gpu else "CPU operators' own time",
        "busy_ms_per_step": ms(total),
        "busy_percent": round(100 * total / 1e6 / wall_s, 1) if on_gpu and wall_s > 0 else None,
        "calls_per_step": round(len(timings) / steps, 1),
        "categories": [{"category": c, "ms_per_step": ms(us), "percent": percent(us)}
                       for c, us in by_category.most_common()],
        "top": [{"name": n, "calls_per_step": round(calls_of[n] / steps, 1), "ms_per_step": ms(us),
                 "percent": percent(us), "category": category(n)} for n, us in time_of.most_common(top)],
    }


def timings_of(prof, on_gpu: bool) -> list[tuple[str, float]]:
    from torch.autograd import DeviceType

    if on_gpu:  # every kernel, memcpy and memset the device ran, with its own duration
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return [(e.name, e.self_cpu_time_total) for e in prof.events()
            if e.device_type == DeviceType.CPU and not e.is_async and e.self_cpu_time_total > 0]


def markdown(s: dict, device: str) -> str:
    busy = f", device busy {s['busy_percent']}% of it" if s["busy_percent"] is not None else ""
    lines = [f"{device}, steps profiled: {s['steps']}; {s['wall_ms_per_step']} ms per step wall{busy}; "
             f"{s['timed']} {s['busy_ms_per_step']} ms per step in {s['calls_per_step']} calls", "",
             "| category | ms/step | % |", "|---|---|---|"]
    lines += [f"| {c['category']} | {c['ms_per_step']} | {c['percent']} |" for c in s["categories"]]
    lines += ["", "| name | calls/step | ms/step | % | category |", "|---|---|---|---|---|"]
    lines += [f"| `{t['name'][:110]}` | {t['calls_per_step']} | {t['ms_per_step']} | {t['percent']} | {t['category']} |"
              for t in s["top"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, loop_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="16-20", help="FIRST-LAST: the optimizer steps to profile (1-based)")
    p.add_argument("--out", required=True, help="folder for profile.md and profile.json")
    a = p.parse_args(ours)
    first, last = (int(x) for x in a.steps.split("-"))
    if not 1 <= first <= last:
        p.error(f"--steps {a.steps}: want FIRST-LAST with 1 <= FIRST <= LAST")

    sys.path.insert(0, str(ROOT))
    import torch

    import train_loop

    on_gpu = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    window: dict = {}
    queue_step = train_loop.train_step

    def profiled_step(run, inject_nan):
        step = run.state.step + 1
        if step == first:
            sync()  # the steps before are done: the window starts empty
            window["profiler"] = torch.profiler.profile(activities=activities)
            window["profiler"].__enter__()
            window["start"] = time.perf_counter()
        queued = queue_step(run, inject_nan)
        if step == last and "profiler" in window:
            sync()  # this step's kernels have run, not only been queued
            window["wall_s"] = time.perf_counter() - window["start"]
            window["profiler"].__exit__(None, None, None)
        return queued

    train_loop.train_step = profiled_step  # fit() looks it up at each step
    rc = train_loop.main(loop_args)
    if "wall_s" not in window:
        print(f"profile_loop: the run ended before step {last} (exit {rc}); nothing profiled", file=sys.stderr)
        return rc or 1
    summary = summarise(timings_of(window["profiler"], on_gpu), last - first + 1, window["wall_s"], on_gpu)
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps({"device": device, "first_step": first, "last_step": last,
                                                  **summary}, indent=1), encoding="utf-8")
    (out / "profile.md").write_text(markdown(summary, device), encoding="utf-8")
    print(markdown(summary, device), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
