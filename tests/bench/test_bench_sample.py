"""bench-sample: the published classifier_sample loop (written in plain torch from guided-diffusion) against
dk.sampling.ddim_sample on a tiny ADM UNet and a tiny noisy classifier, and the command's small run."""
import json

import pytest
import torch

import diffaug_kernels as dk
from diffaug_kernels import cli
from diffaug_kernels.bench import sampling as bench_sampling

STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a CPU shared with other jobs, two OpenMP threads can run these tiny models 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    """Random tiny models with the zero-initialised layers drawn (else the UNet's output, and the classifier's
    gradient, would not depend on t), the spaced tables, x_T and labels."""
    torch.manual_seed(0)
    unet = bench_sampling.randomize_zero_init(dk.models.create_adm_unet(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
        num_head_channels=16, learn_sigma=True)).eval()
    clf = bench_sampling.randomize_zero_init(dk.models.create_classifier(
        image_size=8, classifier_width=32, classifier_depth=1, classifier_attention_resolutions="4", num_classes=5,
        channel_mult="1,2", num_head_channels=16)).eval()
    sched = dk.NoiseSchedule.linear(1000)
    kept = bench_sampling.published_timesteps(1000, STEPS)
    tables = bench_sampling.published_spaced_tables(sched.alphas_cumprod.numpy(), kept)
    return dict(unet=unet, clf=clf, sched=sched, tables=tables, x_T=torch.randn(3, 3, 8, 8),
                y=torch.tensor([0, 3, 4]))


def test_published_spacing():
    """guided-diffusion's "ddimN": the first integer stride with exactly N timesteps."""
    assert bench_sampling.published_timesteps(1000, 25) == list(range(0, 1000, 40))
    assert bench_sampling.published_timesteps(1000, 10) == list(range(0, 1000, 100))
    with pytest.raises(ValueError, match="stride"):
        bench_sampling.published_timesteps(1000, 999)


@pytest.mark.parametrize("guided", [False, True])
def test_published_loop_equals_ddim_sample(setup, guided):
    """From the same x_T the published loop and ddim_sample give the same images to float32 rounding; the
    loop itself is sensitive to what it must get right: the classifier's sign and the timestep map each move the
    images far past the tolerance, and guidance changes them."""
    s = setup
    clf, y = (s["clf"], s["y"]) if guided else (None, None)
    published = bench_sampling.published_guided_ddim(s["unet"], clf, s["x_T"], y, 3.0, s["tables"])
    ours = dk.sampling.ddim_sample(s["unet"], s["sched"], s["x_T"], f"ddim{STEPS}", classifier=clf, y=y,
                                   classifier_scale=3.0)
    torch.testing.assert_close(ours, published, rtol=0, atol=1e-4)
    respaced_indices = dict(s["tables"], timestep_map=list(range(STEPS)))  # no map: the model sees 0..S-1
    wrong = [bench_sampling.published_guided_ddim(s["unet"], clf, s["x_T"], y, 3.0, respaced_indices)]
    if guided:
        wrong.append(bench_sampling.published_guided_ddim(s["unet"], clf, s["x_T"], y, -3.0, s["tables"]))
        unguided = bench_sampling.published_guided_ddim(s["unet"], None, s["x_T"], None, 3.0, s["tables"])
        assert (published - unguided).abs().max() > 0.1
    for w in wrong:
        assert (w - ours).abs().max() > 0.05


def test_classifier_sees_the_original_timesteps(setup):
    """cond_fn goes through the same timestep map as the model (SpacedDiffusion wraps both)."""
    s = setup
    seen = []

    def clf(x, t):
        seen.append(t.clone())
        return s["clf"](x, t)

    bench_sampling.published_guided_ddim(s["unet"], clf, s["x_T"], s["y"], 1.0, s["tables"])
    assert [int(t[0]) for t in seen] == list(range(900, -1, -100))
    assert all(t.shape == (3,) and t.dtype == torch.int64 for t in seen)


def test_bench_sample_command(tmp_path, capsys):
    """The command at toy size: the published row and the dk rows timed, the JSON with its ratios and checks."""
    path = tmp_path / "s.json"
    assert cli.main(["bench-sample", "--device", "cpu", "--size", "8", "--batch", "2", "--steps", "2", "--reps", "1",
                     "--warmup", "1", "--no-compile", "--dtypes", "float32,bfloat16", "--threads", "1",
                     "--json", str(path), "--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    res = json.loads(path.read_text())
    names = [r["impl"] for r in res["rows"]]
    assert names == ["published classifier_sample loop (fp32 eager)", "dk.sampling.ddim_sample, fp32 eager",
                     "dk.sampling.ddim_sample, bf16 eager"]
    assert res["complete"] and res["steps"] == 2 and res["timesteps"] == [0, 500] and res["size"] == 8
    for r in res["rows"]:
        assert r["vs_published"] == pytest.approx(r["images_per_s"] / res["rows"][0]["images_per_s"])
    best = max(res["rows"][1:], key=lambda r: r["images_per_s"])
    assert res["best_dk_row"] == best["impl"] and all(isinstance(v, float) for v in res["ratios"].values())
    assert res["ratios"]["guided_sampling_vs_published"] == pytest.approx(best["vs_published"])
    assert res["checks"]["fp32_match"] and res["checks"]["fp32_max_abs_diff"] < 1e-3
    assert set(res["checks"]["max_abs_diff_vs_published_fp32"]) == set(names)
    assert res["env"]["torch"] == torch.__version__ and "triton" in res["env"]
    assert "the published loop" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "int8"], "dtypes must be"),
    (["--steps", "0"], "positive integer"),
    (["--scale", "-1"], ">= 0"),
    (["--steps", "999"], "no integer stride"),
    (["--size", "12"], "does not suit"),
])
def test_bench_sample_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench-sample", "--device", "cpu", *argv])
    text = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert message in text and len(text.strip().splitlines()) == 1
