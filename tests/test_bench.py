"""bench/bench_gpu.py runs end to end on CPU with the whisper-tiny shape (a smoke test: numbers are not judged,
only that every measurement ran and reported sane values). About a minute of CPU: six subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_gpu_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--device", "cpu", "--model", "tiny", "--steps", "2",
         "--log-every", "1", "--batch", "2", "--workers", "0", "--train-rows", "8", "--eval-samples", "3",
         "--generation-max-length", "12", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**__import__("os").environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert result["device_name"] == "cpu" and result["peak_tflops"] is None
    assert result["settings"]["precision"] == "fp32" and result["settings"]["model"] == "tiny"
    run = result["run"]
    assert run["shape"]["vocab_size"] == 51865 and run["shape"]["d_model"] == 384
    assert 36 < run["parameters_millions"] < 40  # whisper-tiny has 37.8 M parameters (39 M with its 448 positions)
    # Between 6 x parameters x decoder tokens (every weight used once per token) and 6 x parameters x (1500 encoder
    # frames + tokens) (every weight used for every position, which the embeddings are not)
    params, tokens = run["parameters_millions"] * 1e6, run["label_tokens_mean"]
    assert 6 * params * tokens < run["flops_per_training_sample"] < 6 * params * (1500 + tokens)
    for name in ("ours", "trainer", "ceiling_eager"):
        r = run["train"][name]
        assert "error" not in r, (name, r.get("log_tail"))
        assert r["samples_per_second"] > 0 and r["ratio_to_trainer"] > 0
        assert r["mfu_percent"] is None and r["peak_gpu_memory_gb"] is None  # CPU: no known peak, no GPU memory
    assert run["train"]["trainer"]["ratio_to_trainer"] == 1.0
    assert run["train"]["ours"]["timed_samples"] == run["train"]["trainer"]["timed_samples"] == 2  # step 2 x batch 2
    assert run["train"]["ours"]["attention"] == "sdpa" and not run["train"]["ours"]["compile_fallback"]
    ev = run["eval"]
    for name in ("ours", "trainer"):
        assert ev[name]["samples"] == 3 and ev[name]["seconds"] > 0 and ev[name]["seconds_first_pass"] > 0
    assert ev["ours"]["static_cache_compiled"] is False  # torch_compile auto: off without CUDA
    assert ev["compared"] == 3 and ev["identical_transcripts"] == 3  # fp32, same greedy decoding on both sides
    assert ev["nonempty_transcripts"] >= 1  # identical because both said something, not because both said nothing
    assert ev["speedup"] > 0
    assert "| ours |" in proc.stderr and "identical transcripts 3/3" in proc.stderr
