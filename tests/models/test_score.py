"""dk.models.score: the embedded digits score model, train-score exports and the --score-model resolver.

The shipped model's check is an honest quality bound: its eps MSE on held-out digits far below a fresh UNet's,
and below the best per-pixel Gaussian denoiser's."""
import json
import os

import pytest
import torch

import diffaug_kernels as dk
from diffaug_kernels import pretrained, utils
from diffaug_kernels.data import digits

TINY_UNET = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                 in_channels=1)


def _eps_mse(model, x0, schedule, t, seed=0):
    with torch.no_grad():
        x_t = dk.forward_noise(x0, t, schedule, seed=seed)
        eps = dk.philox_normal(x0.shape, seed)
        return torch.mean((model(x_t, torch.full((x0.shape[0],), t)) - eps) ** 2).item()


def test_default_score_model_loads_and_denoises_held_out_digits():
    model, schedule = pretrained.load_default_score_model()
    assert os.path.getsize(pretrained.DEFAULT_WEIGHTS) < 5_000_000
    assert not model.training and model.prediction == "eps"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 1_921_601  # the digits32 config
    assert schedule.num_timesteps == 1000 and model.in_channels == 1 and model.image_size == 32
    meta = pretrained.read_metadata(pretrained.DEFAULT_WEIGHTS)
    assert meta["command"] == pretrained.DEFAULT_COMMAND

    x0 = digits("test", size=32)[:][0][:200]
    torch.manual_seed(0)
    fresh = dk.models.create_adm_unet(**meta["config"]).eval()
    t = 300
    trained, untrained = _eps_mse(model, x0, schedule, t), _eps_mse(fresh, x0, schedule, t)
    # the best per-pixel Gaussian denoiser (train-set mean and variance per pixel): what no structure buys
    xtr = digits("train", size=32)[:][0]
    a, b = schedule.sqrt_alphas_cumprod[t].item(), schedule.sqrt_one_minus_alphas_cumprod[t].item()
    mu, var = xtr.mean(0), xtr.var(0)
    x_t = dk.forward_noise(x0, t, schedule, seed=0)
    gauss = torch.mean((b * (x_t - a * mu) / (a * a * var + b * b) - dk.philox_normal(x0.shape, 0)) ** 2).item()
    assert untrained > 0.9
    assert trained < 0.25 * untrained, (trained, untrained)
    assert trained < 0.6 * gauss, (trained, gauss)


def test_default_score_model_missing_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "DEFAULT_WEIGHTS", str(tmp_path / "gone.safetensors"))
    with pytest.raises(FileNotFoundError, match="(?s)gone.safetensors.*train-score"):
        pretrained.load_default_score_model()


def test_default_score_model_missing_is_a_clear_error(monkeypatch, tmp_path):
    from diffaug_kernels import pretrained

    monkeypatch.setattr(pretrained, "DEFAULT_WEIGHTS", str(tmp_path / "gone.safetensors"))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        pretrained.resolve_score_model("default", "digits")


def test_score_model_from_a_train_score_export(tmp_path):
    """A .safetensors whose metadata carries the config and schedule (what `diffaug train-score --export`
    writes) loads through dk.pretrained with its own schedule and prediction; --score-flag goes to the
    guided-diffusion loader instead."""
    import dataclasses

    from safetensors.torch import save_file

    cfg = dk.models.ADMConfig(**TINY_UNET)
    state = {k: v.half() for k, v in cfg.create().state_dict().items()}
    path = str(tmp_path / "tiny.safetensors")
    save_file(state, path, metadata={"config": json.dumps(dataclasses.asdict(cfg)), "prediction": "eps",
                                     "schedule": json.dumps({"name": "cosine", "T": 1000})})
    model, schedule = pretrained.resolve_score_model(path, "digits")
    assert model.in_channels == 1 and schedule.num_timesteps == 1000 and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert torch.allclose(schedule.betas, dk.NoiseSchedule.cosine(1000).betas)
    with pytest.raises(utils.UsageError, match="score model"):  # the flags of another architecture do not fit
        pretrained.resolve_score_model(path, "digits", "digits32")


@pytest.mark.parametrize("schedule, config, prediction, msg", [
    ({"name": "cosine", "T": 10**9}, None, "eps", r"'T': an integer in \[1, 100000\]"),
    ([1000], None, "eps", "schedule must be"),
    ({"name": "cosine", "T": 1000}, "not a dict", "eps", "config must be a JSON object"),
    ({"name": "cosine", "T": 1000}, {"bogus_flag": 1}, "eps", "config builds no ADM UNet"),
    ({"name": "cosine", "T": 1000}, None, "noise", "prediction must be one of"),
])
def test_export_metadata_is_checked_before_anything_is_allocated(tmp_path, schedule, config, prediction, msg):
    """A score-model file's metadata is bounded and checked: T = 1e9 would allocate tables until memory runs out
    (tens of seconds, then MemoryError); a bad value is one ValueError naming the file, raised before the schedule
    or the network is built (no timing here: the refusal itself is what a bounded load shows)."""
    from safetensors.torch import save_file

    cfg = dk.models.ADMConfig(**TINY_UNET)
    path = str(tmp_path / "bad.safetensors")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()} if config is None else config
    save_file({k: v.half() for k, v in cfg.create().state_dict().items()}, path,
              metadata={"config": json.dumps(config), "prediction": prediction, "schedule": json.dumps(schedule)})
    with pytest.raises(ValueError, match=msg) as e:
        pretrained.load_score_model(path)
    assert "bad.safetensors" in str(e.value)
