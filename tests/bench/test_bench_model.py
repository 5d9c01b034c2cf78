"""dk.bench.model: the UNet, DiffAug-step and DiffAug-Ensemble benchmarks at toy size, and the profile's reading."""
import json

import pytest

from diffaug_kernels.bench import model as bench_model


def test_bench_model_candidates_are_gpu_only():
    with pytest.raises(ValueError, match="nothing to compare"):
        bench_model.run(device="cpu", candidates=True)


def test_profile_groups_kernel_names_by_what_they_do():
    """Kernel names from an H200 profile of the compiled DiffAug step (bench-model --profile): inductor's fused kernels
    name the aten ops they absorbed, so they must not count as convolutions."""
    from diffaug_kernels.bench.model import profile_group

    assert profile_group("triton_poi_fused__to_copy_clone_convolution_native_group_norm_12") \
        == "inductor-generated (fused elementwise / norm)"
    assert profile_group("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert profile_group("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop>") == "convolution"
    assert profile_group("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert profile_group("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_TNN") == "matmul"
    assert profile_group("void noise_plane_kernel<c10::BFloat16, c10::BFloat16, 2>") == "dk ops (noise, tweedie)"


def test_profile_names_the_slowest_inductor_kernels_in_full():
    """The profile's table cuts kernel names at 55 characters (in an H100 profile, three 10.3 ms kernels all read
    "triton_poi_fused__to_copy_add_convolution_mul_permut..."); the full names follow, slowest first, so the
    generated source can be found. Other kernels and zero-time (CPU-side) events are left out."""
    from types import SimpleNamespace as E

    from diffaug_kernels.bench.model import full_kernel_names

    long = "triton_poi_fused__to_copy_add_convolution_mul_permute_rsqrt_silu_split_sub_unsqueeze_var_mean_12"
    events = [E(key="sm90_xmma_fprop", count=46, self_device_time_total=66589.0),
              E(key="triton_red_fused_var_mean_3", count=7, self_device_time_total=7270.0),
              E(key=long, count=3, self_device_time_total=30895.0),
              E(key="triton_poi_fused_cat_9", count=1, self_device_time_total=0.0)]
    lines = full_kernel_names(events, "self_device_time_total", rows=5)
    assert lines[1] == "inductor kernels by self time, full names:"
    assert lines[2].split() == ["30.895", "ms", "3", "calls", long]
    assert lines[3].split()[-1] == "triton_red_fused_var_mean_3" and len(lines) == 4
    assert full_kernel_names(events[:1], "self_device_time_total", rows=5) == []  # none: no section


def test_bench_model_runs_at_toy_size(tmp_path):
    """bench-model at toy size: every UNet and DiffAug-step variant timed, JSON written."""
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 num_head_channels=16, learn_sigma=True)
    res = bench_model.run(device="cpu", batch=2, flags=flags, reps=1, warmup=1, json_path=str(tmp_path / "m.json"),
                          profile=str(tmp_path / "profile.txt"), nchw=True, fused=True)
    assert [r["group"] for r in res["rows"]] == ["unet forward"] * 5 + ["DiffAug step"] * 3
    assert res["rows"][3]["impl"] == bench_model.UNET_FUSED  # opt-in on the CPU: one more compile each
    assert res["rows"][4]["impl"] == "compiled bf16 autocast, contiguous (NCHW)"
    assert set(res["ratios"]) == {"unet_fused_vs_compiled", "diffaug_step_vs_published"}
    assert 0 <= res["checks"]["unet_fused_max_abs_diff_vs_compiled"] < 0.1
    assert res["profile_fused_ms"]["convolution"] > 0 and (tmp_path / "profile.txt.fused").is_file()
    assert all(r["ms"] > 0 and r["images_per_s"] > 0 for r in res["rows"])
    assert res["flops_per_forward"] > 0 and json.loads((tmp_path / "m.json").read_text())["complete"]
    prof = res["profile_ms"]  # the compiled step's op time by group: convolutions and the dk ops show up
    assert prof["convolution"] > 0 and prof["dk ops (noise, tweedie)"] > 0
    assert "time by group" in (tmp_path / "profile.txt").read_text()


def test_bench_ensemble_runs_and_reports(tmp_path):
    """The DE benchmark at toy size: every mode timed, ratios consistent, JSON written."""
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 num_head_channels=16, learn_sigma=True)
    res = bench_model.run_ensemble(device="cpu", batch=2, flags=flags, classifier="resnet10t", reps=1, warmup=1,
                                   compile=True, json_path=str(tmp_path / "de.json"))
    rows = {r["impl"]: r for r in res["rows"]}
    names = list(rows)
    assert names[0] == "per-t loop, published (fp32 eager)" and names[4].startswith("DDA") and len(names) == 7
    assert names[5:] == ["DE, bf16 compiled, all 9 t in one call", "per-t loop, dk ops, bf16 compiled"]
    assert all(r["ms"] > 0 for r in res["rows"]) and res["rows"][0]["vs_published_loop"] == 1.0
    ips = {n: r["images_per_s"] for n, r in rows.items()}
    assert res["ratios"]["batching, bf16 eager: DE all in one call / dk loop"] == pytest.approx(
        ips["DE, bf16 eager, all 9 t in one call"] / ips["per-t loop, dk ops, bf16 eager"])
    assert len(res["ratios"]) == 5
    assert res["chunk_rows"] % 2 == 0 and 2 <= res["chunk_rows"] <= 18
    saved = json.loads((tmp_path / "de.json").read_text())
    assert saved["complete"] and [r["impl"] for r in saved["rows"]] == names


def test_bench_certify_runs_and_reports(tmp_path):
    """The certify benchmark at toy size: the published DDS loop and each dk row timed, ratios to the first."""
    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                 num_head_channels=16, learn_sigma=True)
    res = bench_model.run_certify(device="cpu", batch=2, flags=flags, classifier="resnet10t", batches=2, reps=1,
                                  warmup=1, compile=False, json_path=str(tmp_path / "c.json"))
    names = [r["impl"] for r in res["rows"]]
    assert names == ["DDS loop, published (fp32 eager)", "dk.certify, fp32 eager", "dk.certify, bf16 eager"]
    assert res["t_star"] == 259 and res["samples_per_call"] == 4
    for r in res["rows"]:
        assert r["ms"] > 0 and r["samples_per_s"] == pytest.approx(4 / (r["ms"] * 1e-3))
        assert r["vs_published"] == pytest.approx(r["samples_per_s"] / res["rows"][0]["samples_per_s"])
    assert json.loads((tmp_path / "c.json").read_text())["complete"]
    with pytest.raises(ValueError, match="learn_sigma"):
        bench_model.run_certify(device="cpu", flags={**flags, "learn_sigma": False})


def test_the_published_dds_loop_smooths_as_dk_certify_does():
    """The timed baseline computes the same smoothed classifier: with an eps-model predicting zero, x0_hat is
    clip(x + r eps) in both, so a sign-of-pixel-0 classifier counts class 1 with probability Phi(x0 / r) in both
    (binomial counts within 5 standard deviations of each other)."""
    import math

    import torch
    from scipy.stats import norm

    import diffaug_kernels as dk

    class Zero(torch.nn.Module):
        in_channels = 1

        def forward(self, x, t):
            return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    class Sign(torch.nn.Module):
        def forward(self, v):
            return torch.stack([-v[:, 0, 0, 0], v[:, 0, 0, 0]], 1)

    sched = dk.NoiseSchedule.linear(1000)
    sm = dk.certify.DenoisedSmoothing(Sign(), Zero(), sched, 0.25, 2)
    x = torch.full((1, 4, 4), 0.3)
    tables = {**bench_model._published_tables(sched), **bench_model._published_posterior(sched)}
    n = 4000
    torch.manual_seed(0)
    published = bench_model.published_dds_counts(Zero(), Sign(), x, sm.t, n, 500, tables, 2)
    ours = sm.sample_counts(x, n, 500, seed=1)
    r = float(sched.sqrt_one_minus_alphas_cumprod[sm.t] / sched.sqrt_alphas_cumprod[sm.t])
    p = norm.cdf(0.3 / r)
    sd = math.sqrt(n * p * (1 - p))
    assert published.sum() == ours.sum() == n
    assert abs(published[1] - n * p) < 5 * sd and abs(ours[1] - n * p) < 5 * sd
