"""bench/bench_gpu.py runs end to end on CPU with the whisper-tiny shape (a smoke test: numbers are not judged,
only that every measurement ran and reported sane values). About a minute of CPU: six subprocesses."""

from __future__ import annotations

import pytest

import json
import subprocess
import sys

from conftest import ROOT


@pytest.mark.slow
def test_bench_gpu_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--device", "cpu", "--model", "tiny", "--steps", "2",
         "--log-every", "1", "--batch", "2", "--workers", "0", "--train-rows", "8", "--eval-samples", "3",
         "--generation-max-length", "12", "--profile", str(tmp_path / "profile"), "--json", str(out)],
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
    assert run["train"]["ours"]["attention_kernel"] == "flash_attention"  # SDPA's choice on CPU (its flash kernel)
    # --profile: ours' last step under torch.profiler, its CPU operators sorted into the categories
    assert run["train"]["ours"]["profiled_steps"] == "2-2"
    profile = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert profile["device"] == "cpu" and profile["steps"] == 1 and profile["busy_percent"] is None
    shares = {c["category"]: c["percent"] for c in profile["categories"]}
    assert abs(sum(shares.values()) - 100) < 0.1 * len(shares)  # each share is rounded to 0.1
    for needed in ("matmul", "attention", "convolution", "optimizer and clipping"):  # what a Whisper step does
        assert shares.get(needed, 0) > 0, (needed, shares)
    assert "| matmul |" in (tmp_path / "profile" / "profile.md").read_text()
    ev = run["eval"]
    for name in ("ours", "trainer"):
        assert ev[name]["samples"] == 3 and ev[name]["seconds"] > 0 and ev[name]["seconds_first_pass"] > 0
    assert ev["ours"]["static_cache_compiled"] is False  # torch_compile auto: off without CUDA
    assert ev["compared"] == 3 and ev["identical_transcripts"] == 3  # fp32, same greedy decoding on both sides
    assert ev["nonempty_transcripts"] >= 1  # identical because both said something, not because both said nothing
    assert ev["speedup"] > 0
    assert "| ours |" in proc.stderr and "identical transcripts 3/3" in proc.stderr


def test_profile_sorts_gpu_kernels_into_categories():
    """The GPU side of bench/profile_loop.py, which the CPU smoke test cannot reach: kernel names as the CUDA
    profiler reports them (cuBLAS, cuDNN, flash attention, Triton, ATen) and their times, added up by hand."""
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_loop import summarise

    kernels = [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 500.0),
               ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", 100.0),
               ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", 150.0),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", 50.0),
               ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", 40.0),
               ("triton_per_fused_add_native_layer_norm_0", 60.0), ("triton_poi_fused_gelu_1", 40.0),
               ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamWMathFunctor>", 30.0),
               ("Memcpy HtoD (Pinned -> Device)", 20.0),
               ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 10.0)]
    s = summarise(kernels * 2, steps=2, wall_s=0.004, on_gpu=True)  # 2 steps of 1 ms of kernels in 4 ms
    assert s["busy_ms_per_step"] == 1.0 and s["busy_percent"] == 50.0 and s["calls_per_step"] == 10
    assert s["wall_ms_per_step"] == 2.0
    assert {c["category"]: c["percent"] for c in s["categories"]} == {
        "matmul": 60.0, "attention": 20.0, "fused by torch.compile": 10.0, "convolution": 4.0,
        "optimizer and clipping": 3.0, "copies and fills": 2.0, "other element-wise and reductions": 1.0}
    assert s["top"][0]["name"].startswith("sm90_xmma_gemm") and s["top"][0]["ms_per_step"] == 0.5
    assert s["top"][0]["calls_per_step"] == 1


@pytest.mark.slow
def test_attention_bench_times_each_backend_and_compares_it_with_math(tmp_path):
    """bench/bench_attention.py on CPU: the backends CPU has run and agree with math, the CUDA-only ones are
    reported as unavailable instead of failing the run, and the default names the backend SDPA chose."""
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_attention.py"), "--frames", "300", "--batch", "1",
                           "--tokens", "32", "--iters", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dtype"] == "fp32" and len(result["shapes"]) == 2
    for shape, rows in result["shapes"].items():
        assert rows["math"]["max_abs_diff_vs_math"] == 0 and rows["math"]["ms"] > 0
        assert rows["flash_attention"]["max_abs_diff_vs_math"] < 1e-5  # CPU's flash kernel, same sums reordered
        assert rows["cudnn_attention"] == rows["efficient_attention"] == {"error": "not available here"}
        assert rows["default"]["chosen"] in ("FLASH_ATTENTION", "MATH")
        assert rows["default"]["max_abs_diff_vs_math"] < 1e-5
    assert "| encoder self-attention (300 x 300) | math |" in proc.stdout
