"""dk.bench.train (bench-train): the DiffAug training step's parts, its timing split, the run at toy size, its
JSON's ratios and chart; bench-model's ratios."""
import json

import pytest
import torch
import torch.nn.functional as F

from diffaug_kernels.bench import harness, plots
from diffaug_kernels.bench import model as bench_model
from diffaug_kernels.bench import train as bench_train
from diffaug_kernels.commands import bench_train as command
from diffaug_kernels.commands.options import Parser

TOY_UNET = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                num_head_channels=16, learn_sigma=True)


def test_train_step_is_the_authors_objective_and_steps_the_optimizer():
    """classifier(): loss = CE(f(x), y) + CE(f(x0_hat), y) over one batch of both, gradients of that loss;
    optimizer_step() applies them (plain SGD here: w - lr * grad) and clears them."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2) * 2 - 1, torch.tensor([0, 1, 2, 1])
    x0_hat = torch.rand(4, 3, 2, 2) * 2 - 1
    w0 = net[1].weight.detach().clone()
    step = bench_train.TrainStep(lambda v: x0_hat, net, torch.optim.SGD(net.parameters(), lr=0.5), x, y)
    assert torch.equal(step.augment(), x0_hat)
    step.classifier(x0_hat)
    want = F.cross_entropy(net(x), y) + F.cross_entropy(net(x0_hat), y)
    torch.testing.assert_close(step.loss, want.detach())
    (g,) = torch.autograd.grad(want, net[1].weight)
    torch.testing.assert_close(net[1].weight.grad, g)
    step.optimizer_step()
    torch.testing.assert_close(net[1].weight.detach(), w0 - 0.5 * g)
    assert net[1].weight.grad is None


def test_time_steps_warms_each_then_times_the_rows_in_turn():
    """Every row warmed up first, then each round times one step of every row, part by part, in order."""
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def augment(self):
            calls.append(self.name + "a")
            return 1

        def classifier(self, v):
            assert v == 1
            calls.append(self.name + "c")

        def optimizer_step(self):
            calls.append(self.name + "o")

        def __call__(self):
            self.classifier(self.augment())
            self.optimizer_step()

    tm = bench_train.time_steps({"p": Fake("p"), "d": Fake("d")}, reps=3, warmup=2, device="cpu")
    assert calls == ["pa", "pc", "po"] * 2 + ["da", "dc", "do"] * 2 + ["pa", "pc", "po", "da", "dc", "do"] * 3
    assert list(tm) == ["p", "d"]
    for t in tm.values():
        assert list(t["split_ms"]) == list(bench_train.PHASES)
        assert all(v >= 0 for v in t["split_ms"].values()) and t["ms"] >= t["min_ms"] > 0 and t["first_call_ms"] > 0


def test_headline_ratios_only_of_rows_measured():
    ips = {"a": 30.0, "b": 10.0}
    assert harness.headline_ratios(ips, {"x": ("a", "b"), "y": ("fused", "b")}) == {"x": 3.0}
    assert harness.headline_ratios({}, {"x": ("a", "b")}) == {}


def test_bench_train_runs_and_reports(tmp_path):
    """At toy size (eager package rows: compiling takes minutes on a 2-core CPU): the published row and one row
    per dtype, each split into parts that add up to its step (one rep: exactly), the ratio of the fastest
    package row to the published one, the JSON complete, and a chart."""
    res = bench_train.run_train(device="cpu", batch=2, flags=TOY_UNET, classifier="resnet10t", reps=1, warmup=1,
                                dtypes=(torch.float32, torch.bfloat16), compile=False,
                                json_path=str(tmp_path / "t.json"))
    names = [r["impl"] for r in res["rows"]]
    assert names == ["published (fp32 eager DiffAug, fp32 eager NCHW classifier)",
                     "dk (fp32 eager DiffAug, eager channels_last fp32 classifier)",
                     "dk (bf16 eager DiffAug, eager channels_last bf16 classifier)"]
    for r in res["rows"]:
        assert r["ms"] > 0 and r["images_per_s"] == pytest.approx(2 / (r["ms"] * 1e-3))
        assert sum(r["split_ms"].values()) == pytest.approx(r["ms"], rel=1e-6)
        assert sum(r["split_share"].values()) == pytest.approx(1.0)
        assert r["vs_published"] == pytest.approx(r["images_per_s"] / res["rows"][0]["images_per_s"])
        assert r["step_ms"] == [pytest.approx(r["ms"])]  # one rep: one step, its time the median
        assert r["vs_published_paired"] == pytest.approx(res["rows"][0]["ms"] / r["ms"])
        assert r["loss"] > 0 and r["loss"] == r["loss"]  # finite: 2 x CE of 10 classes, about 4.6 at the start
    best = max(res["rows"][1:], key=lambda r: r["images_per_s"])
    assert res["headline_row"] == best["impl"]
    assert res["ratios"] == {"train_step_vs_published": pytest.approx(best["vs_published"])}
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["complete"] and saved["ratios"] == res["ratios"] and saved["env"]["device"] == "cpu"
    assert saved["phases"] == list(bench_train.PHASES) and saved["batch"] == 2 and saved["size"] == 16
    png = plots.results_chart(saved, str(tmp_path / "t.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_train_checks_its_arguments():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        bench_train.run_train(device="cpu", flags=TOY_UNET, optimizer="lamb")
    with pytest.raises(ValueError, match="size 21 is not a multiple of 2"):
        bench_train.run_train(device="cpu", flags=TOY_UNET, size=21)


def test_bench_train_options():
    p = Parser(prog="diffaug bench-train")
    command.add_arguments(p)
    a = p.parse_args(["--dtypes", "float32,bfloat16", "--opt", "adamw", "--no-compile", "--batch", "4"])
    assert a.dtypes == (torch.float32, torch.bfloat16) and a.opt == "adamw" and not a.compile and a.batch == 4
    assert p.parse_args([]).dtypes is None and p.parse_args([]).compile  # device defaults: bench_train.default_dtypes
    assert bench_train.default_dtypes(gpu=False) == (torch.float32,)
    assert bench_train.default_dtypes(gpu=True) == (torch.bfloat16,)
    with pytest.raises(SystemExit):
        p.parse_args(["--dtypes", "int8"])


def test_bench_model_writes_its_headline_ratios(monkeypatch, tmp_path):
    """bench-model's JSON carries "ratios": the DiffAug step against the published pipeline, and no
    unet_fused_vs_compiled while no fused UNet row is timed. (Compiling stubbed out and each row run once: the
    wiring of names and ratios is under test here, not the timings.)"""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(bench_model, "matmul_rate", lambda device, **kw: 1e9)
    monkeypatch.setattr(harness, "time_fn", lambda fn, **kw: (fn(), harness.Timing(10.0, 10.0, 10.0))[1])
    res = bench_model.run(device="cpu", batch=2, flags=TOY_UNET, reps=1, warmup=1, json_path=str(tmp_path / "m.json"))
    ips = {r["impl"]: r["images_per_s"] for r in res["rows"]}
    assert bench_model.UNET_COMPILED in ips and bench_model.STEP_DK in ips and bench_model.UNET_FUSED not in ips
    assert res["ratios"] == {"diffaug_step_vs_published": ips[bench_model.STEP_DK] / ips["published (fp32 eager)"]}
    assert json.loads((tmp_path / "m.json").read_text())["ratios"] == res["ratios"]


def test_bench_train_command_checks_before_running(monkeypatch, tmp_path, capsys):
    """`bench-train` is a command of the CLI; a --size the UNet cannot halve and a --plot path in a file are refused
    before anything is timed; the run's result goes to the chart."""
    from diffaug_kernels import cli

    monkeypatch.setattr(bench_train, "run_train", lambda **k: pytest.fail("ran before checking its options"))
    with pytest.raises(SystemExit, match="--size: size 30 is not a multiple of 4"):
        cli.main(["bench-train", "--device", "cpu", "--size", "30"])
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        cli.main(["bench-train", "--device", "cpu", "--plot", str(tmp_path / "f" / "x.png")])
    seen = {}
    fake = dict(env={"device": "cpu"}, batch=2, size=32, rows=[dict(
        impl="published (fp32 eager DiffAug, fp32 eager NCHW classifier)", ms=100.0, images_per_s=20.0,
        vs_published=1.0, split_ms=dict.fromkeys(bench_train.PHASES, 100 / 3),
        split_share=dict.fromkeys(bench_train.PHASES, 1 / 3))])
    monkeypatch.setattr(bench_train, "run_train", lambda **k: seen.update(k) or fake)
    assert cli.main(["bench-train", "--device", "cpu", "--dtypes", "float32", "--reps", "1",
                     "--plot", str(tmp_path / "c.png")]) == 0
    assert seen["dtypes"] == (torch.float32,) and seen["reps"] == 1 and seen["optimizer"] == "sgd" and seen["compile"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
