"""The command line runs (smoke): argument errors are clear; the bench prints its table and writes JSON."""
import json

import numpy as np
import pytest
import torch

from diffaug_kernels import cli
from diffaug_kernels.commands import options


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--shapes", "2x3x8x8", "--dtypes", "float32", "--ops", "tweedie", "--reps", "1",
                     "--warmup", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "eager (published)" in table and "compiled (published)" in table and "fused (cpu)" in table
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"eager (published)", "fused (cpu)"} and all(r["ms"] > 0 for r in rows)
    # the same-bytes copy comes first, moves what the op moves (tweedie: x_t, eps half, out), and every row's
    # ratio to it and to eager is its own time against theirs
    by = {r["impl"]: r for r in rows}
    assert rows[0]["impl"] == "copy (same bytes)"
    from diffaug_kernels.bench import harness as bench

    for op, n in [("tweedie", 3), ("forward_noise", 2), ("forward_noise_multi", 11)]:
        for dtype in (torch.float32, torch.bfloat16):
            case = bench.make_case(op, (2, 3, 8, 8), dtype)
            dst = case.impls[bench.SAME_COPY]()  # copy_ returns its destination: half the bytes, written
            assert 2 * dst.numel() * dst.element_size() == case.nbytes == n * 2 * 3 * 8 * 8 * dtype.itemsize
    for r in rows:
        assert r["vs_same_bytes_copy"] == pytest.approx(by["copy (same bytes)"]["ms"] / r["ms"])
        assert r["speedup"] == pytest.approx(by["eager (published)"]["ms"] / r["ms"])


def test_bench_default_json_never_replaces_a_kept_result(tmp_path, monkeypatch, capsys):
    """Without --json the table goes to benchmarks/results/<device>-<date>.json; a file of that name (an
    earlier run's kept result) stays as it was and the new one takes the next free -N name."""
    import datetime

    monkeypatch.chdir(tmp_path)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    stem = f"cpu-{datetime.date.today().isoformat()}"
    (results / f"{stem}.json").write_text("kept")
    argv = ["bench", "--device", "cpu", "--shapes", "2x3x8x8", "--dtypes", "float32", "--ops", "tweedie",
            "--reps", "1", "--warmup", "1"]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    capsys.readouterr()
    assert (results / f"{stem}.json").read_text() == "kept"
    assert json.loads((results / f"{stem}-2.json").read_text())["rows"]
    assert json.loads((results / f"{stem}-3.json").read_text())["rows"]


def test_bench_plot_and_plot_of_the_kept_file(tmp_path, capsys):
    """bench --plot draws the run; `plot` draws the JSON it kept, the same chart."""
    out, png, png2 = tmp_path / "r.json", tmp_path / "run.png", tmp_path / "kept.png"
    assert cli.main(["bench", "--shapes", "2x3x8x8", "--dtypes", "float32", "--ops", "tweedie", "--reps", "1",
                     "--warmup", "1", "--json", str(out), "--plot", str(png)]) == 0
    assert cli.main(["plot", str(out), "--out", str(png2)]) == 0
    assert str(png2) in capsys.readouterr().out
    from PIL import Image

    a, b = np.asarray(Image.open(png)), np.asarray(Image.open(png2))
    assert a.shape == b.shape and a.shape[0] > 100 and np.array_equal(a, b)


def test_plot_paths_are_checked_before_the_benchmark(tmp_path, monkeypatch):
    """--plot into a missing folder makes it; a path under a file is one line before any timing (the results
    would otherwise be lost after the run); the model benchmarks refuse a size the UNet cannot halve."""
    from diffaug_kernels.bench import harness as bench
    from diffaug_kernels.bench import model as bench_model

    png = tmp_path / "new" / "deeper" / "run.png"
    assert cli.main(["bench", "--shapes", "2x3x8x8", "--dtypes", "float32", "--ops", "tweedie", "--reps", "1",
                     "--warmup", "1", "--no-json", "--plot", str(png)]) == 0
    assert png.is_file()
    (tmp_path / "f").write_text("")
    monkeypatch.setattr(bench, "run_bench", lambda **k: pytest.fail("timed before checking --plot"))
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        cli.main(["bench", "--plot", str(tmp_path / "f" / "x.png")])
    monkeypatch.setattr(bench_model, "run", lambda **k: pytest.fail("ran before checking --size"))
    monkeypatch.setattr(bench_model, "run_ensemble", lambda **k: pytest.fail("ran before checking --size"))
    for cmd in ("bench-model", "bench-ensemble"):
        with pytest.raises(SystemExit, match="--size: size 10 is not a multiple of"):
            cli.main([cmd, "--device", "cpu", "--size", "10"])
    with pytest.raises(SystemExit, match="--candidates are settings of the compiled GPU UNet"):
        cli.main(["bench-model", "--device", "cpu", "--candidates"])


def _bar_width(img, label):
    from diffaug_kernels.bench import plots

    mask = np.abs(img - np.array(plots.bar_color(label))).sum(-1) == 0
    return mask.sum(1).max()  # the widest pixel row of that colour: the bar's length


def test_charts_draw_bars_as_long_as_their_values(tmp_path):
    from PIL import Image

    from diffaug_kernels.bench import plots

    row = dict(op="tweedie", shape=[1, 3, 8, 8], dtype="bfloat16", ms=1.0, speedup=1.0)
    ops = {"env": {"device_name": "test"}, "copy_gb_s": 10.0,
           "rows": [dict(row, impl="eager (published)", pct_copy=20.0), dict(row, impl="fused (cuda)", pct_copy=80.0)]}
    img = np.asarray(Image.open(plots.results_chart(ops, str(tmp_path / "c.png"))).convert("RGB")).astype(int)
    assert _bar_width(img, "fused (cuda)") == pytest.approx(4 * _bar_width(img, "eager (published)"), abs=2)
    # bench-model / bench-ensemble rows: images/s
    model = {"env": {}, "batch": 8, "size": 32,
             "rows": [dict(group="DiffAug step", impl="published (fp32 eager)", ms=3.0, images_per_s=30.0,
                           vs_first=1.0),
                      dict(group="DiffAug step", impl="dk.DiffAug compile=True, bf16", ms=1.0, images_per_s=90.0,
                           vs_first=3.0)]}
    img = np.asarray(Image.open(plots.results_chart(model, str(tmp_path / "m.png"))).convert("RGB")).astype(int)
    assert _bar_width(img, "dk.DiffAug compile=True") == pytest.approx(3 * _bar_width(img, "published"), abs=2)
    with pytest.raises(ValueError, match="no rows"):
        plots.results_chart({"rows": []}, str(tmp_path / "e.png"))
    with pytest.raises(ValueError, match="finite non-negative"):
        plots.plot_bars({"g": [("a", float("nan"), "")]}, str(tmp_path / "n.png"))


def test_plot_of_a_file_that_is_not_a_result(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="cannot draw it"):
        cli.main(["plot", str(bad)])
    with pytest.raises(SystemExit, match="cannot draw it"):
        cli.main(["plot", str(tmp_path / "missing.json")])


@pytest.mark.parametrize("argv, msg", [
    (["bench", "--shapes", "2x3x8"], "BxCxHxW"),
    (["bench", "--dtypes", "int8"], "dtypes must be"),
    (["bench", "--ops", "denoise"], "ops must be"),
    (["bench", "--reps", "0"], "positive integer"),
])
def test_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert msg in capsys.readouterr().err


def test_an_argument_with_control_characters_is_one_escaped_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench-model", "--cudnn-benchmark", "a\nb\x02"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: a\\nb\\x02 " in err, err


def test_results_name_their_commit(monkeypatch):
    """A result file names the code behind it: the git HEAD, or DIFFAUG_GIT_COMMIT where a copied tree's .git
    is stale (the lent GPU machines)."""
    from diffaug_kernels.bench import harness as bench

    monkeypatch.setenv("DIFFAUG_GIT_COMMIT", "0123abc")
    assert bench.environment("cpu")["git"]["commit"] == "0123abc"
    monkeypatch.delenv("DIFFAUG_GIT_COMMIT")
    state = bench.environment("cpu")["git"]
    assert state is None or len(state["commit"]) == 40


@pytest.mark.parametrize("cmd", ["bench", "bench-model", "bench-ensemble", "train-score", "evaluate"])
@pytest.mark.parametrize("device, msg", [("foo", "bad --device 'foo'"), ("tpu", "bad --device 'tpu'"),
                                         ("mps", "--device mps: not supported"),
                                         ("cuda", "--device cuda: torch sees no CUDA device")])
def test_bad_device_is_one_line_before_any_work(cmd, device, msg, monkeypatch):
    """Every command checks --device as bench does, before a model or data set is made (no GPU here: cuda)."""
    from diffaug_kernels.bench import model as bench_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for name in ("run", "run_ensemble"):
        monkeypatch.setattr(bench_model, name, lambda *a, **k: pytest.fail("the benchmark started"))
    extra = ["--classifier", "x.pt"] if cmd == "evaluate" else []
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--device", device, *extra])
    assert str(e.value).startswith(f"diffaug {cmd}: ") and msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cmd", ["bench-model", "bench-ensemble"])
def test_device_auto_reaches_the_benchmark_as_a_real_device(cmd, monkeypatch):
    """--device auto passes the check and the benchmark gets the device it names, not the word 'auto'."""
    from diffaug_kernels.bench import model as bench_model

    seen = []
    for name in ("run", "run_ensemble"):
        monkeypatch.setattr(bench_model, name, lambda *a, **k: seen.append(torch.device(k["device"])) or {})
    assert cli.main([cmd, "--device", "auto"]) == 0
    assert seen == [torch.device("cuda" if torch.cuda.is_available() else "cpu")]


def test_check_device_accepts_what_exists():
    assert options.check_device("x", "cpu") == torch.device("cpu")
    assert options.check_device("x", None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert options.check_device("x", "auto") == options.check_device("x", None)
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert options.check_device("x", "cuda:0") == torch.device("cuda:0")
        with pytest.raises(SystemExit, match=f"sees only {n} CUDA device"):
            options.check_device("x", f"cuda:{n}")


def test_bench_ensemble_dda_reps_zero_skips_the_dda_row(tmp_path, capsys):
    """--dda-reps 0: no DDA row, no DE / DDA ratio; the table, the JSON and its chart cope."""
    out, png = tmp_path / "de.json", tmp_path / "de.png"
    assert cli.main(["bench-ensemble", "--device", "cpu", "--batch", "1", "--size", "8", "--reps", "1", "--warmup",
                     "1", "--dda-reps", "0", "--no-compile", "--json", str(out), "--plot", str(png)]) == 0
    cap = capsys.readouterr()
    assert "DDA skipped: --dda-reps 0" in cap.out and "DDA (" not in cap.out + cap.err
    res = json.loads(out.read_text())
    assert res["complete"] and res["dda_reps"] == 0 and len(res["rows"]) == 4
    assert not any("DDA" in r["impl"] for r in res["rows"]) and not any("DDA" in k for k in res["ratios"])
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit):
        cli.main(["bench-ensemble", "--dda-reps", "-1"])
    assert "--dda-reps: must be a non-negative integer" in capsys.readouterr().err


def test_bench_ensemble_dda_row_says_what_it_is_doing(monkeypatch, capsys):
    """The DDA row logs before its warm-up and before its timed calls (it runs for minutes on a CPU)."""
    from diffaug_kernels import dda
    from diffaug_kernels.bench import model as bench_model

    calls = []

    def fake_dda(classifier, model, schedule, x, **kw):
        calls.append(1)
        return torch.zeros(x.shape[0], 10)

    monkeypatch.setattr(dda, "dda_predict", fake_dda)
    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                 learn_sigma=True)
    res = bench_model.run_ensemble(device="cpu", batch=1, flags=flags, classifier="resnet10t", reps=1, warmup=1,
                                   dda_reps=2, compile=False)
    err = capsys.readouterr().err
    lines = err.splitlines()
    i = next(i for i, s in enumerate(lines) if "1 untimed warm-up call, then 2 timed" in s)
    assert "DDA warm-up call done" in lines[i + 1] and "2 timed call(s) follow" in lines[i + 1]
    assert len(calls) == 3
    dda_row = next(r for r in res["rows"] if r["impl"].startswith("DDA"))
    assert dda_row["reps"] == 2 and "DE measured chunk / DDA (same eager UNet)" in res["ratios"]


def test_demo_help_agrees_with_the_readme(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    import re
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    minutes = re.search(r"demo.*?; ([0-9.]+) minutes on 2 cores", readme).group(1)  # the main command's line
    seconds = re.search(r"default threads, ([0-9]+) s wall", readme).group(1)  # the demo section's run
    assert f"{minutes} minutes ({seconds} s)" in text and "default threads" in text, (minutes, seconds, text)


def test_readme_quickstart_runs_as_written():
    """The README's quickstart is code people paste: run it verbatim and check what its comments promise."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10  # "a quickstart in ten lines"
    env = {}
    exec(compile(code, "README.md quickstart", "exec"), env)
    x0_hat = env["x0_hat"]
    assert env["x_t"].shape == env["x0"].shape == x0_hat.shape and torch.isfinite(x0_hat).all()
    import diffaug_kernels as dk

    lo = (torch.tensor([-1.0, -1.0, -1.0]) + 1) / 2  # clipped to [-1, 1], then normalised: classifier-ready
    mean, std = (torch.tensor(v) for v in dk.IMAGENET_NORM)
    assert (x0_hat.amin(dim=(0, 2, 3)) >= (lo - mean) / std - 1e-5).all()
    assert (x0_hat.amax(dim=(0, 2, 3)) <= (1 - mean) / std + 1e-5).all()


def test_every_option_has_help_that_says_its_default_once():
    """Each option of each command has a help text; the formatter adds the default unless the help says it, so
    no help says it twice (nor "(default: None)")."""
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"{name} {a.option_strings[0]} has no help"
            text = fmt._expand_help(a).lower()
            assert text.count("(default") <= 1 and "(default: none)" not in text, f"{name} {a.option_strings}: {text}"
