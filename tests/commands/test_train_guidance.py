"""`diffaug train-guidance` (commands/train_guidance.py) and dk.models.load_guidance_classifier: both kinds train
and reload to the same logits as an independent rebuild, a training step is classifier_train's step recomputed
here, resume is exact, errors are one line. Tiny EncoderUNets on 16x16 digits and a tiny score-model export."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_failure, cli_subprocess

import diffaug_kernels as dk
from diffaug_kernels import cli, pretrained
from diffaug_kernels.commands import train_guidance as tg
from diffaug_kernels.models import ADMConfig, create_adm_unet, create_classifier, load_guidance_classifier
from diffaug_kernels.models.score import export_safetensors

TINY_CLF = ["--image-size", "16", "--channel_mult", "1,2", "--classifier_attention_resolutions", "",
            "--batch-size", "4", "--eval-images", "8", "--eval-times", "0,500", "--no-progress"]


def tiny_score_export(path):
    torch.manual_seed(0)
    cfg = ADMConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                    in_channels=1)
    return str(export_safetensors(create_adm_unet(**cfg), str(path), cfg, "linear", 1000, dtype="float32"))


def _cli(*argv):
    return cli.main(["train-guidance", *argv])


@pytest.fixture(scope="module")
def score_export(tmp_path_factory):
    return tiny_score_export(tmp_path_factory.mktemp("score") / "tiny.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, score_export):
    """4 steps of each kind through the CLI, checkpoints at 2 and 4, a log record per step."""
    out = {}
    for kind in ("noisy", "da"):
        d = tmp_path_factory.mktemp(kind)
        assert _cli("--kind", kind, "--score-model", score_export, *TINY_CLF, "--steps", "4", "--save-interval", "2",
                    "--log-interval", "1", "--out", str(d)) == 0
        out[kind] = d
    return out


@pytest.mark.parametrize("kind", ["noisy", "da"])
def test_checkpoint_reloads_to_an_independent_rebuild(kind, runs, score_export):
    d = runs[kind]
    assert sorted(p.name for p in d.glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    ckpt = tg.load_checkpoint(str(d))
    assert ckpt["step"] == 4 and ckpt["kind"] == kind and ckpt["image_channels"] == 1
    flags = ckpt["classifier"]
    assert flags["in_channels"] == (2 if kind == "da" else 1) and flags["num_classes"] == 10
    assert flags["image_size"] == 16 and flags["classifier_width"] == 32
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 4] and set(log[-1]["eval"]) == {"0", "500"}
    assert json.loads((d / "eval.json").read_text())["accuracy"] == log[-1]["eval"]

    net = load_guidance_classifier(str(d / "ckpt_0000004.pt"))
    assert not net.training and net.guidance_info["kind"] == kind and net.guidance_info["num_classes"] == 10
    # the same logits from the weights, rebuilt here: create_classifier + the state_dict, and for kind da
    # [x_t, clip(tweedie)] through the export's score model and the linear schedule
    clf = create_classifier(**{k: v for k, v in flags.items()}).eval()
    clf.load_state_dict(ckpt["model"])
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([0, 400, 999])
    with torch.no_grad():
        if kind == "da":
            score, sched = pretrained.load_score_model(score_export)
            x0 = dk.reference.tweedie(x_t, score(x_t, t), t, sched).clamp(-1, 1)
            want = clf(torch.cat([x_t, x0], 1), t)
        else:
            want = clf(x_t, t)
        torch.testing.assert_close(net(x_t, t), want, rtol=1e-5, atol=1e-5)
    assert net(x_t, t).abs().sum() > 0


def test_a_step_is_classifier_train_recomputed():
    """GuidanceTrainer.step: t ~ U{0..T-1} and the Philox seed from torch's generator, x_t = forward_noise,
    cross-entropy, AdamW (annealed lr): the same weights from a loop written here (dk.forward_noise itself is
    tested against the reference in tests/ops; the same x_t keeps AdamW's near-zero gradients comparable)."""
    sched = dk.NoiseSchedule.linear(1000)
    torch.manual_seed(0)
    clf = create_classifier(image_size=16, in_channels=1, num_classes=10, classifier_width=32, classifier_depth=1,
                            classifier_attention_resolutions="", channel_mult="1,2", num_head_channels=32)
    ref = copy.deepcopy(clf)
    trainer = tg.GuidanceTrainer(clf, clf.parameters(), sched, lr=1e-3, weight_decay=0.05, total_steps=4,
                                 anneal_lr=True)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.05)
    x0, y = dk.data.digits("train", size=16)[:6]
    torch.manual_seed(5)
    losses = [trainer.step(x0, y)[0] for _ in range(3)]
    torch.manual_seed(5)
    for k in range(3):
        t = torch.randint(0, 1000, (6,))
        s = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
        x_t = dk.forward_noise(x0, t, sched, seed=s)
        for grp in opt.param_groups:
            grp["lr"] = 1e-3 * (1 - k / 4)
        loss = F.cross_entropy(ref.train()(x_t, t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert losses[k] == pytest.approx(loss.item(), rel=1e-6)
    for (name, a), b in zip(clf.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert trainer.current_lr() == pytest.approx(1e-3 * (1 - 3 / 4))


@pytest.mark.parametrize("kind", ["noisy", "da"])
def test_half_then_resume_equals_straight(kind, runs, tmp_path):
    """2 steps, then --resume to 4, is the straight 4-step run: same losses, same weights and optimizer state."""
    half = tmp_path / "half"
    assert _cli("--kind", kind, "--score-model", tg.load_checkpoint(str(runs[kind]))["score_model"]["spec"],
                *TINY_CLF, "--steps", "2", "--log-interval", "1", "--out", str(half)) == 0
    assert _cli("--resume", str(half), "--steps", "4", "--eval-times", "", "--no-progress") == 0
    straight, resumed = tg.load_checkpoint(str(runs[kind])), tg.load_checkpoint(str(half))
    assert resumed["step"] == 4 and resumed["args"]["kind"] == kind
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    exp_avg = [s["exp_avg"] for s in straight["optimizer"]["state"].values()]
    got_avg = [s["exp_avg"] for s in resumed["optimizer"]["state"].values()]
    for a, b in zip(got_avg, exp_avg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    losses = {r["step"]: r["loss"] for r in map(json.loads, (runs[kind] / "log.jsonl").read_text().splitlines())
              if "loss" in r}
    again = {r["step"]: r["loss"] for r in map(json.loads, (half / "log.jsonl").read_text().splitlines())
             if "loss" in r}
    assert sorted(again) == [1, 2, 3, 4]
    assert again == pytest.approx(losses, rel=1e-5)


def test_keep_and_resume_mismatch(runs, tmp_path, capsys):
    d = tmp_path / "k"
    score = tg.load_checkpoint(str(runs["noisy"]))["score_model"]["spec"]
    assert _cli("--score-model", score, *TINY_CLF, "--steps", "3", "--save-interval", "1", "--keep", "1",
                "--eval-times", "", "--out", str(d)) == 0
    assert [p.name for p in d.glob("ckpt_*.pt")] == ["ckpt_0000003.pt"]
    with pytest.raises(SystemExit, match="classifier_width=64 differs from the checkpoint's 32"):
        _cli("--resume", str(d), "--classifier_width", "64", "--steps", "5")
    assert _cli("--resume", str(d), "--steps", "2", "--no-progress") == 0
    assert "leaves nothing to train" in capsys.readouterr().out


def test_clear_errors(tmp_path, score_export):
    with pytest.raises(SystemExit, match="training data not found.*nope"):
        _cli("--data", str(tmp_path / "nope"), "--score-model", score_export, *TINY_CLF, "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="kind da needs a score model"):
        _cli("--kind", "da", "--score-model", "random", "--score-config", "digits32", *TINY_CLF,
             "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="eval times \\[1000\\] lie outside"):
        _cli("--score-model", score_export, *TINY_CLF, "--steps", "0", "--eval-times", "1000", "--out",
             str(tmp_path / "e"))
    with pytest.raises(SystemExit, match="checkpoint not found"):
        _cli("--resume", str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match="bad.pt is not a train-guidance checkpoint"):
        load_guidance_classifier(str(bad))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="text.pt is not a train-guidance checkpoint"):
        load_guidance_classifier(str(tmp_path / "text.pt"))
    with pytest.raises(FileNotFoundError, match="guidance classifier checkpoint not found"):
        load_guidance_classifier(str(tmp_path / "none.pt"))


def test_cli_failure_is_one_line_in_a_subprocess(tmp_path):
    rc, _, err = cli_subprocess("train-guidance", "--classifier_pool", "max", "--out", str(tmp_path))
    assert_one_line_failure(rc, err, "train-guidance", "--classifier_pool", "invalid choice")
    rc, _, err = cli_subprocess("train-guidance", "--data", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert_one_line_failure(rc, err, "diffaug train-guidance", "training data not found")


def test_ctrl_c_stops_at_a_step_with_a_checkpoint(tmp_path, score_export, monkeypatch):
    """The first Ctrl-C (SIGINT) stops after the current step: a checkpoint of that step, no evaluation, exit 130;
    --resume continues from it."""
    import os
    import signal

    step = tg.GuidanceTrainer.step

    def interrupted(self, x0, y):
        out = step(self, x0, y)
        if self.step_count == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(tg.GuidanceTrainer, "step", interrupted)
    d = tmp_path / "run"
    assert _cli("--score-model", score_export, *TINY_CLF, "--steps", "5", "--out", str(d)) == 130
    assert [p.name for p in d.glob("ckpt_*.pt")] == ["ckpt_0000002.pt"] and not (d / "eval.json").exists()
    monkeypatch.setattr(tg.GuidanceTrainer, "step", step)
    assert _cli("--resume", str(d), "--eval-times", "", "--no-progress") == 0
    assert tg.load_checkpoint(str(d))["step"] == 5


@pytest.mark.parametrize("kind", ["noisy", "da"])
def test_export_is_the_final_classifier_without_the_optimizer(kind, tmp_path, score_export):
    out, export = tmp_path / "run", tmp_path / f"{kind}.safetensors"
    assert _cli("--kind", kind, "--score-model", score_export, *TINY_CLF, "--steps", "2", "--eval-times", "",
                "--out", str(out), "--export", str(export)) == 0
    from_ckpt, from_export = (load_guidance_classifier(str(p)) for p in (out / "ckpt_0000002.pt", export))
    assert from_export.guidance_info == from_ckpt.guidance_info and from_export.guidance_info["step"] == 2
    assert type(from_export) is type(from_ckpt)
    g = torch.Generator().manual_seed(2)
    x_t, t = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.equal(from_export(x_t, t), from_ckpt(x_t, t))
    from safetensors import safe_open
    with safe_open(str(export), framework="pt") as f:
        assert not any("optimizer" in k or k.startswith("exp_avg") for k in f.keys())
        assert json.loads(f.metadata()["train_args"])["kind"] == kind
    # a damaged copy (one flipped byte in the tensor data) and a file of another kind are one-line errors
    raw = bytearray(export.read_bytes())
    raw[-5] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad.safetensors is damaged"):
        load_guidance_classifier(str(bad))
    with pytest.raises(ValueError, match="tiny.safetensors is not a train-guidance checkpoint or export"):
        load_guidance_classifier(score_export)
    with pytest.raises(SystemExit, match="--export must name a .safetensors file"):
        _cli("--score-model", score_export, *TINY_CLF, "--steps", "1", "--out", str(out), "--export", "x.pt")
