"""`diffaug train-score` (commands/train_score.py): DDPM training, checkpoints and exact resume, the export.
Tiny UNets on 16x16 digits keep this fast."""
import json
import os

import pytest
import torch
from helpers import assert_one_line_failure, cli_subprocess

import diffaug_kernels as dk
from diffaug_kernels import cli, pretrained
from diffaug_kernels.commands import train_score
from diffaug_kernels.data import digits

TINY = ["--model", "image_size=16", "--model", "num_res_blocks=1", "--model", "channel_mult=1,2",
        "--model", "attention_resolutions=8"]
TINY_CFG = dict(image_size=16, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8")


def _cli(*argv):
    return cli.main(["train-score", *argv])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """3 steps of the CLI on digits with a tiny UNet, a checkpoint at step 2 and the final one, an export."""
    out = tmp_path_factory.mktemp("run")
    export = out / "tiny.safetensors"
    assert _cli(*TINY, "--steps", "3", "--batch-size", "8", "--save-every", "2", "--log-every", "1",
                "--out", str(out), "--export", str(export), "--no-progress") == 0
    return out, export


def test_cli_writes_checkpoints_log_and_export(tiny_run):
    out, export = tiny_run
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000003.pt"]
    ckpt = train_score.load_checkpoint(str(out))  # a directory means its newest checkpoint
    assert ckpt["step"] == 3 and ckpt["schedule"] == {"name": "linear", "T": 1000}
    assert {"model", "ema", "optimizer", "args", "config", "rng"} <= set(ckpt)
    assert ckpt["config"]["image_size"] == 16 and ckpt["config"]["in_channels"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in log)

    meta = pretrained.read_metadata(export)
    assert meta["schedule"] == {"name": "linear", "T": 1000} and meta["prediction"] == "eps"
    assert meta["config"]["num_res_blocks"] == 1 and meta["dtype"] == "float16"
    assert "train-score" in meta["command"] and "--steps 3" in meta["command"]
    model, schedule = pretrained.load_score_model(export)
    assert not model.training and schedule.num_timesteps == 1000 and schedule.name == "linear"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the export is the EMA (float16-rounded), not the raw weights
    ema = ckpt["ema"]["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ema[k].to(torch.float16).float(), rtol=0, atol=0)
    assert any(not torch.equal(ema[k], ckpt["model"][k]) for k in ema)


def test_resume_continues_the_step_count_and_matches_an_unbroken_run(tiny_run, tmp_path):
    out, _ = tiny_run
    first = train_score.load_checkpoint(str(out / "ckpt_0000002.pt"))
    resumed = tmp_path / "resumed"
    assert _cli("--resume", str(out / "ckpt_0000002.pt"), "--steps", "3", "--out", str(resumed), "--no-progress") == 0
    ckpt = train_score.load_checkpoint(str(resumed))
    assert ckpt["step"] == 3 and ckpt["args"]["model_overrides"] == first["args"]["model_overrides"]
    assert ckpt["ema"]["num_updates"] == 3
    # same data position, RNG state, optimizer and EMA: the resumed step 3 is the unbroken run's step 3
    unbroken = train_score.load_checkpoint(str(out / "ckpt_0000003.pt"))
    for k, v in unbroken["model"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-5, atol=1e-6)
    # a directory resumes from its newest checkpoint and counts on; without --out it writes there too
    assert _cli("--resume", str(resumed), "--steps", "4", "--no-progress") == 0
    assert train_score.load_checkpoint(str(resumed))["step"] == 4 and (resumed / "ckpt_0000004.pt").exists()


def test_resume_with_fewer_steps_says_nothing_is_left(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    assert _cli("--resume", str(out / "ckpt_0000002.pt"), "--steps", "1", "--out", str(tmp_path / "r"),
                "--no-progress") == 0
    assert "leaves nothing to train" in capsys.readouterr().out


def test_resume_rejects_a_different_architecture(tiny_run):
    out, _ = tiny_run
    with pytest.raises(ValueError, match="differs from the checkpoint"):
        train_score.train(resume=str(out), config="imagenet64_cond", steps=4, out=str(out))


def test_loss_decreases_on_a_fixed_batch_and_ema_lags():
    torch.manual_seed(0)
    cfg = train_score.resolve_config("digits32", TINY_CFG)
    model = dk.models.create_adm_unet(**cfg)
    schedule = dk.NoiseSchedule.linear(1000)
    trainer = train_score.ScoreTrainer(model, schedule, lr=2e-3, lr_warmup=5, ema=0.99)
    x0 = digits("train", size=16)[:16][0]
    t = torch.linspace(50, 700, 16).long()
    losses = [trainer.step(x0, t=t, seed=1234) for _ in range(40)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] > 0.9  # the output convolution starts at zero: the first prediction is eps = 0
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    raw, ema = model.state_dict(), trainer.ema.model.state_dict()
    assert any(not torch.allclose(raw[k], ema[k]) for k in raw)
    assert trainer.step_count == 40 and trainer.ema.num_updates == 40


def test_bf16_autocast_step_is_finite():
    torch.manual_seed(0)
    model = dk.models.create_adm_unet(**train_score.resolve_config("digits32", TINY_CFG))
    trainer = train_score.ScoreTrainer(model, dk.NoiseSchedule.cosine(100), bf16=True)
    loss = trainer.step(digits("train", size=16)[:8][0])
    assert loss == loss and 0 < loss < 10
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_missing_data_path_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(SystemExit, match="training data not found.*no-such-folder"):
        _cli("--data", missing, "--steps", "1", "--out", str(tmp_path / "o"))
    with pytest.raises(SystemExit, match="training data not found"):
        _cli("--data", f"cifar10:{missing}", "--steps", "1", "--out", str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        train_score.train(data=missing, steps=1, out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown config 'nope'"):
        _cli("--config", "nope", "--steps", "1", "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="model flags look like NAME=VALUE"):
        _cli("--model", "widths=3", "--steps", "1", "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="must be a .safetensors path"):
        _cli(*TINY, "--steps", "1", "--export", str(tmp_path / "m.pt"), "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="checkpoint not found"):
        _cli("--resume", str(tmp_path / "missing.pt"), "--out", str(tmp_path))


def test_ema_warmup():
    ema = train_score.EMA(torch.nn.Linear(2, 2), decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.num_updates += 1
    assert decays == [pytest.approx(1 / 10), pytest.approx(2 / 11), pytest.approx(3 / 12)]
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999


# ------------------------------------------------------------------------------- the shipped model


def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path):
    """A text file, a non-dict pickle or another command's checkpoint given to --resume: one line naming the
    file (torch's weights-only unpickler alone says KeyError: 101), before any data or model work."""
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    for path, why in ((text, "neither a torch.save archive nor a pickle"), (listed, "it holds a list"),
                      (other, "format 'something else'")):
        with pytest.raises(SystemExit) as e:
            _cli("--resume", str(path), "--out", str(tmp_path / "o"))
        msg = str(e.value)
        assert msg.startswith(f"diffaug train-score: {path} is not a train-score checkpoint") and why in msg, msg
        assert "\n" not in msg
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match=r"garbled.pt is not a train-score checkpoint "
                                         r"\(torch.load\(weights_only=True\) refused it: "):
        train_score.load_checkpoint(str(garbled))
    assert not (tmp_path / "o").exists()


def test_device_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_score, "load_data", lambda *a, **k: pytest.fail("data loaded before the device check"))
    with pytest.raises(SystemExit, match="diffaug train-score: --device cuda: torch sees no CUDA device"):
        _cli(*TINY, "--steps", "1", "--device", "cuda", "--out", str(tmp_path / "o"))


def test_score_files_that_are_not_train_score_exports_are_named(tiny_run, tmp_path):
    """A .pt file, or an export whose schedule metadata lacks T, is one clear error naming the file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    pt = tmp_path / "gd.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(ValueError, match="not a safetensors file.*load_guided_diffusion"):
        pretrained.load_score_model(pt)
    _, export = tiny_run
    with safe_open(str(export), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "no_T.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "schedule": json.dumps({"name": "linear"})})
    with pytest.raises(ValueError, match=r"'T': an integer in \[1, 100000\]"):
        pretrained.load_score_model(bad)


def _flip(path, at, n=64):
    """n bytes at offset `at` inverted: a damaged but still readable file."""
    raw = bytearray(open(path, "rb").read())
    raw[at:at + n] = bytes(255 - v for v in raw[at:at + n])
    open(path, "wb").write(bytes(raw))


def test_damaged_checkpoints_are_refused_and_resume_falls_back(tiny_run, tmp_path, capsys):
    """Checkpoints and exports carry a checksum: 64 flipped bytes are refused, naming the file; --resume DIR takes
    the newest checkpoint that verifies and says which it skipped and why; a truncated one says so."""
    import shutil

    out, export = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    newest = run / "ckpt_0000003.pt"
    _flip(newest, os.path.getsize(newest) // 2)
    with pytest.raises(ValueError, match="ckpt_0000003.pt is damaged: its contents do not match the checksum"):
        train_score.load_checkpoint(str(newest))
    skipped = []
    ckpt = train_score.load_checkpoint(str(run), log=skipped.append)
    assert ckpt["step"] == 2 and ckpt["path"].endswith("ckpt_0000002.pt")
    assert len(skipped) == 1 and "skipping" in skipped[0] and "ckpt_0000003.pt is damaged" in skipped[0]
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes((run / "ckpt_0000002.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.pt is truncated or damaged"):
        train_score.load_checkpoint(str(truncated))
    assert _cli("--resume", str(run), "--steps", "4", "--no-progress") == 0  # the CLI resumes from step 2
    said = capsys.readouterr().out
    assert "skipping" in said and "ckpt_0000003.pt is damaged" in said and "not counted" in said
    # --keep 2 keeps the two newest that verify: the damaged step-3 file does not push out step 2
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000003.pt",
                                                             "ckpt_0000004.pt"]
    assert train_score.load_checkpoint(str(run / "ckpt_0000004.pt"))["step"] == 4
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]  # step 3, trained again after the fallback to step 2, is logged once

    damaged = tmp_path / "damaged.safetensors"
    shutil.copy(export, damaged)
    _flip(damaged, os.path.getsize(damaged) - 200)  # in the tensor data, after the header
    with pytest.raises(ValueError, match="damaged.safetensors is damaged: its tensor data do not match"):
        pretrained.load_score_model(damaged)
    assert pretrained.read_metadata(export)["sha256"] != "0" * 64
    pretrained.load_score_model(export)  # the intact export verifies


@pytest.mark.parametrize("case", ["lr", "data", "export", "damaged resume", "model flag"])
def test_cli_failures_are_one_line_in_a_subprocess(case, tiny_run, tmp_path):
    """What a user gets wrong, run as a user runs it: one line on stderr naming it, a non-zero exit, no traceback."""
    out, _ = tiny_run
    damaged = tmp_path / "ckpt_0000002.pt"
    damaged.write_bytes((out / "ckpt_0000002.pt").read_bytes())
    _flip(damaged, os.path.getsize(damaged) // 2)
    argv, said = {
        "lr": (["--lr", "-1"], ["argument --lr: must be a finite number > 0"]),
        "data": (["--data", str(tmp_path / "nope")], ["nope"]),
        "export": (["--export", str(tmp_path / "m.pt")], ["export must be a .safetensors path"]),
        "damaged resume": (["--resume", str(damaged)], ["ckpt_0000002.pt is damaged: its contents do not match"]),
        "model flag": (["--model", "num_channels"], ["model flags look like NAME=VALUE", "got 'num_channels'"]),
    }[case]
    rc, _, err = cli_subprocess("train-score", *TINY, "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress",
                                *argv)
    assert_one_line_failure(rc, err, "diffaug train-score", *said)
