"""dk.models.from_diffusers / load_diffusers: a diffusers UNet2DModel and its scheduler as a score model, checked
against diffusers' own scheduler arithmetic (scheduler.step(...).pred_original_sample, DDIMScheduler's loop).

Tiny UNet2DModel instances with random weights (nothing is downloaded)."""
import sys

import pytest
import torch

import diffaug_kernels as dk
from diffaug_kernels import pretrained
from diffaug_kernels.models import diffusers as dkd
from diffaug_kernels.utils import UsageError

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers; "
                                                    "requirements.txt has it for the tests)")

SCHEDULERS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}
TIMES = (0, 1, 137, 500, 998, 999)


def tiny_unet(seed=0, channels=3):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8)
    with torch.no_grad():  # a larger output, so that unclipped estimates leave [-1, 1]
        unet.conv_out.weight.mul_(4)
    return unet.eval()


def make_scheduler(kind, prediction, beta_schedule, clip):
    s = SCHEDULERS[kind](num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type=prediction,
                         clip_sample=clip)
    if kind == "ddim":
        s.set_timesteps(1000)  # DDIM's step needs its inference timesteps; all of them, so every t is one
    return s


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("clip", [True, False])
def test_tweedie_is_diffusers_pred_original_sample(kind, prediction, beta_schedule, clip):
    unet = tiny_unet()
    scheduler = make_scheduler(kind, prediction, beta_schedule, clip)
    model, schedule, pred = dk.models.from_diffusers(unet, scheduler)
    assert pred == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    assert schedule.num_timesteps == 1000
    torch.testing.assert_close(schedule.betas, scheduler.betas.double())
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 3, 8, 8, generator=g) * 1.5
    for t in TIMES:
        with torch.no_grad():
            out = model(x_t, t)
            torch.testing.assert_close(out, unet(x_t, t).sample)
            want = scheduler.step(out, t, x_t).pred_original_sample
        got = dk.tweedie(x_t, out, torch.full((2,), t), schedule, pred, clip=clip)
        if clip:
            assert got.abs().max() <= 1
        else:
            assert got.abs().max() > 1 or t < 100  # the unclipped estimate leaves [-1, 1] at large t
        # diffusers works in float32 from float32 alphas_cumprod; sqrt(1/abar - 1) reaches ~157 at t = 999
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * (1 + schedule.sqrt_recipm1_alphas_cumprod[t]))


def test_sample_prediction_and_learned_variance_channels():
    unet = tiny_unet()
    model, schedule, pred = dk.models.from_diffusers(unet, diffusers.DDPMScheduler(prediction_type="sample"))
    assert pred == "x0" and model.prediction == "x0"
    x_t = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        out = model(x_t, 10)
    want = diffusers.DDPMScheduler(prediction_type="sample").step(out, 10, x_t).pred_original_sample
    torch.testing.assert_close(dk.tweedie(x_t, out, torch.tensor([10]), schedule, pred), want)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_diffaug_takes_the_model_unchanged(prediction):
    unet = tiny_unet(seed=3)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction)
    model, schedule, pred = dk.models.from_diffusers(unet, scheduler)
    aug = dk.DiffAug(model, schedule, prediction=pred)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    out, t = aug(x0, seed=11, return_t=True)
    x_t = dk.forward_noise(x0, t, schedule, seed=11)
    for i in range(3):  # diffusers' step takes one timestep per call
        with torch.no_grad():
            m = unet(x_t[i:i + 1], t[i]).sample
        want = scheduler.step(m, int(t[i]), x_t[i:i + 1]).pred_original_sample
        torch.testing.assert_close(out[i:i + 1], want, rtol=1e-4, atol=1e-3)


def test_diffaug_ensemble_and_certify_take_it():
    model, schedule, pred = dk.models.from_diffusers(tiny_unet(), diffusers.DDPMScheduler())
    aug = dk.DiffAug(model, schedule, prediction=pred)
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    probs = dk.diffaug_ensemble(clf, aug, x, times=(0, 100, 400), seed=0)
    assert probs.shape == (2, 4) and torch.allclose(probs.sum(1), torch.ones(2))
    smooth = dk.certify.DenoisedSmoothing(clf, model, schedule, sigma=0.25, num_classes=4, prediction=pred)
    counts = smooth.sample_counts(x[0], num=6, batch_size=3, seed=0)
    assert counts.sum() == 6


def test_ddim_sampler_matches_diffusers_ddim_loop():
    sampling = pytest.importorskip("diffaug_kernels.sampling")
    unet = tiny_unet(seed=5)
    for clip in (False, True):
        scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=clip, set_alpha_to_one=True)
        model, schedule, pred = dk.models.from_diffusers(unet, scheduler)
        x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        got = sampling.ddim_sample(model, schedule, x_T, steps="ddim10", clip=clip, prediction=pred)
        scheduler.set_timesteps(10)  # "leading" spacing: 0, 100, ..., 900, guided-diffusion's ddim10
        x = x_T.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:  # guided-diffusion's DDIM re-derives eps from the clipped x0 estimate
                x = scheduler.step(unet(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


def test_load_diffusers_folder_and_score_model_spec(tmp_path):
    unet = tiny_unet(seed=7)
    scheduler = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    model, schedule, pred = dk.models.load_diffusers(tmp_path / "pipe")
    assert pred == "v" and not model.training and isinstance(model.unet, diffusers.UNet2DModel)
    torch.testing.assert_close(schedule.betas, scheduler.betas.double())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([3, 700])), unet(x, torch.tensor([3, 700])).sample)
    # a model folder with its scheduler config beside it
    unet.save_pretrained(tmp_path / "model")
    scheduler.save_pretrained(tmp_path / "model")
    assert dk.models.load_diffusers(tmp_path / "model")[2] == "v"
    # the recipes' --score-model resolution
    model, schedule = pretrained.resolve_score_model(str(tmp_path / "pipe"), "digits")
    assert model.prediction == "v" and model.in_channels == 3 and schedule.num_timesteps == 1000
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(UsageError, match="carries its own architecture"):
        pretrained.resolve_score_model(str(tmp_path / "pipe"), "digits", "digits32")


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="nowhere"):
        dk.models.load_diffusers(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is not a diffusers folder"):
        dk.models.load_diffusers(tmp_path / "empty")
    with pytest.raises(UsageError, match=r"empty is not a diffusers folder"):
        pretrained.resolve_score_model(str(tmp_path / "empty"), "digits")
    tiny_unet().save_pretrained(tmp_path / "unet_only")
    with pytest.raises(ValueError, match=r"unet_only has no scheduler"):
        dk.models.load_diffusers(tmp_path / "unet_only")
    with pytest.raises(TypeError, match="scheduler"):
        dk.models.from_diffusers(tiny_unet(), object())
    bad = diffusers.DDPMScheduler()
    bad.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="'flow'"):
        dk.models.from_diffusers(tiny_unet(), bad)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "unet_only")
    with pytest.raises(ImportError, match="pip install diffusers"):
        dkd.load_diffusers(tmp_path / "unet_only")
