"""`diffaug certify`: the logs' format and rows (the library's CERTIFY on the same seeds), resume after a kill
(no row lost or doubled, the rows of an uninterrupted run), a truncated last line, refusing a log made with other
settings, the table and summary computed from the logs, the plot, Ctrl-C, one-line errors before any model
loads, and torchrun (2 gloo processes: the rows and numbers of one, resumed across world sizes, rank files of a
killed run merged). Tiny everything: a random 1-level ADM UNet, timm's test_resnet as a nearest-class-mean digits
classifier, 8x8 digits, N = 32 at alpha = 0.1 (so rows vary with the noise: some certify, some abstain)."""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from helpers import (
    CLI_ENV,
    TINY_UNET_FLAGS,
    assert_one_line_failure,
    classifier_checkpoint,
    cli_subprocess,
    ncm_checkpoint,
    torchrun,
    torchrun_cmd,
)

import diffaug_kernels as dk
from diffaug_kernels import cli
from diffaug_kernels.commands import certify as cc
from diffaug_kernels.commands import certify_log as cl
from diffaug_kernels.models import classifier

N0, N, BATCH, SIZE, SKIP, ALPHA = 8, 32, 16, 8, 50, 0.1
SCORE_FLAGS = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_UNET_FLAGS.items()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 10-class grey classifier checkpoint and a saved random UNet (so a test can load the very model the
    command used)."""
    root = tmp_path_factory.mktemp("certify")
    ck = ncm_checkpoint(root / "c.pt")
    torch.manual_seed(0)
    unet = dk.models.ADM_CONFIGS["digits32"].replace(**TINY_UNET_FLAGS).create().eval()
    path = str(root / "unet.pt")
    torch.save(unet.state_dict(), path)
    return {"clf": ck, "unet": path, "model": unet}


def argv(files, out, *more, sigma="0.12", max_images=3):
    return ["certify", "--classifier", f"c={files['clf']}", "--score-model", files["unet"], "--score-config",
            "digits32", *[v for f in SCORE_FLAGS for v in ("--score-flag", f)], "--dataset", "digits",
            "--image-size", str(SIZE), "--N0", str(N0), "--N", str(N), "--batch", str(BATCH), "--alpha", str(ALPHA),
            "--skip", str(SKIP), "--max", str(max_images), "--sigma", sigma, "--out", str(out), "--device", "cpu",
            "--threads", "1", "--no-progress", *more]


def rows_of(path, keep_time=False):
    """The log's rows as string tuples (time dropped unless keep_time), its header checked."""
    lines = open(path).read().split("\n")
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime" and lines[-1] == ""
    rows = [tuple(v.split("\t")) for v in lines[1:-1]]
    assert all(len(r) == 6 for r in rows)
    return rows if keep_time else [r[:5] for r in rows]


def test_logs_hold_the_library_rows_and_the_outputs(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(argv(files, out, sigma="0.12,0.25")) == 0
    text = capsys.readouterr().out
    assert "certified accuracy (%)" in text and "best" in text
    ds = dk.data.digits("test", SIZE, 1)
    clf = classifier.load_classifier(files["clf"], "cpu")
    sched = dk.NoiseSchedule.linear(1000)
    changed = []
    for sigma in (0.12, 0.25):
        log, sidecar = out / f"c__sigma_{sigma}.tsv", out / f"c__sigma_{sigma}.json"
        rows = rows_of(log, keep_time=True)
        assert [int(r[0]) for r in rows] == [0, 50, 100]  # every --skip-th index, --max of them
        smooth = dk.certify.DenoisedSmoothing(clf, files["model"], sched, sigma, 10)
        for r in rows:
            idx = int(r[0])
            x, y = ds[idx]
            want = smooth.certify(x, N0, N, ALPHA, BATCH, seed=cc.image_seed(0, idx, sigma))
            other = smooth.certify(x, N0, N, ALPHA, BATCH, seed=cc.image_seed(1, idx, sigma))
            changed.append(other != want)
            assert (int(r[2]), float(r[3])) == want and r[3] == repr(want[1])  # the float's repr, full precision
            assert int(r[1]) == int(y) and r[4] == str(int(want[0] == int(y)))
            h, m, s = r[5].split(":")  # locuslab's h:mm:ss.ffffff
            assert int(h) == 0 and 0 <= int(m) < 60 and 0 < float(s) < 60
        meta = json.loads(sidecar.read_text())
        st = meta["settings"]
        assert meta["format"] == cl.LOG_FORMAT and meta["t"] == dk.certify.dds_timestep(sched, sigma)
        assert (st["N0"], st["N"], st["alpha"], st["sigma"], st["seed"], st["skip"], st["batch"]) == \
               (N0, N, ALPHA, sigma, 0, SKIP, BATCH)
        assert st["classifier"][0] == os.path.abspath(files["clf"]) and st["score_model"]["spec"][0] == files["unet"]
        assert st["dataset"] == ["digits", SIZE, 1]
    assert any(changed)  # the rows depend on the noise, so a wrong seed would show
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["classifiers"]["c"]["sigmas"]) == {"0.12", "0.25"} and summary["images"] == 3
    assert (out / "table.txt").read_text().strip() == summary["table"].strip()
    assert (out / "certified_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_seeds_depend_on_seed_index_and_sigma_only():
    base = cc.image_seed(0, 50, 0.5)
    assert base == cc.image_seed(0, 50, 0.5) and 0 <= base < 2**64
    assert len({base, cc.image_seed(1, 50, 0.5), cc.image_seed(0, 100, 0.5), cc.image_seed(0, 50, 0.25),
                cc.image_seed(2**63 - 1, 50, 0.5)}) == 5


def test_resume_writes_the_rows_of_an_uninterrupted_run(files, tmp_path, capsys):
    """--max 2 then --max 4 (a run killed after two rows, then continued) gives a fresh --max 4 run's rows, each
    once; so does a log whose last line a kill cut short."""
    fresh, resumed, cut = tmp_path / "fresh", tmp_path / "resumed", tmp_path / "cut"
    assert cli.main(argv(files, fresh, max_images=4)) == 0
    want = rows_of(fresh / "c__sigma_0.12.tsv")
    assert [int(r[0]) for r in want] == [0, 50, 100, 150] and len({r[3] for r in want}) > 1
    assert cli.main(argv(files, resumed, max_images=2)) == 0
    assert rows_of(resumed / "c__sigma_0.12.tsv") == want[:2]
    assert json.loads((resumed / "summary.json").read_text())["images"] == 2
    capsys.readouterr()
    assert cli.main(argv(files, resumed, max_images=4)) == 0
    assert "2 images to certify" in capsys.readouterr().out
    assert rows_of(resumed / "c__sigma_0.12.tsv") == want
    # a kill mid-write: the last row is half there, without its newline
    cut.mkdir()
    for name in ("c__sigma_0.12.tsv", "c__sigma_0.12.json"):
        shutil.copy(fresh / name, cut / name)
    log = cut / "c__sigma_0.12.tsv"
    data = log.read_bytes()
    log.write_bytes(data[:data.rstrip(b"\n").rfind(b"\n") + 1 + 6])  # "150\t3\t"-like: a row cut short
    assert not log.read_bytes().endswith(b"\n")
    assert cli.main(argv(files, cut, max_images=4)) == 0
    assert "1 images to certify" in capsys.readouterr().out
    assert rows_of(log) == want
    # a finished log: nothing to certify, the same rows
    assert cli.main(argv(files, cut, max_images=4)) == 0
    assert "to certify" not in capsys.readouterr().out and rows_of(log) == want


def test_refuses_a_log_made_with_other_settings(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(argv(files, out, max_images=1)) == 0
    log, sidecar = out / "c__sigma_0.12.tsv", out / "c__sigma_0.12.json"
    before = log.read_bytes()

    def refused(args, *fragments):
        with pytest.raises(SystemExit) as e:
            cli.main(args)
        msg = str(e.value)
        assert msg.startswith("diffaug certify: error: ") and "\n" not in msg, msg
        assert all(f in msg for f in fragments), msg
        assert log.read_bytes() == before

    refused([v if v != str(N) else "64" for v in argv(files, out, max_images=1)], "other settings",
            "N: 32 there, 64 now")
    refused(argv(files, out, "--alpha", "0.01", max_images=1), "alpha: 0.1 there, 0.01 now")
    refused(argv(files, out, "--seed", "1", max_images=1), "seed")
    refused(argv(files, out, "--dtype", "bfloat16", max_images=1), "dtype")
    refused(argv(files, out, "--denoiser", "multistep", max_images=1), "denoiser: None there, 'multistep' now")
    other = classifier_checkpoint(tmp_path / "other.pt", num_classes=10, in_chans=1, seed=1)
    refused([v.replace(files["clf"], other) for v in argv(files, out, max_images=1)], "classifier")
    keep = sidecar.read_bytes()
    sidecar.unlink()
    refused(argv(files, out, max_images=1), "no readable settings file")
    sidecar.write_bytes(keep)
    log.write_bytes(before + before.split(b"\n", 1)[1])  # the row twice
    before = log.read_bytes()
    refused(argv(files, out, max_images=2), "image 0 twice")
    for foreign in ("something else\n", "no newline"):  # never overwritten, even without a row
        log.write_text(foreign)
        before = log.read_bytes()
        refused(argv(files, out, max_images=1), "is not a certify log")


def test_a_score_model_refused_at_load_leaves_no_log(files, tmp_path):
    """The score model loads before any log is written: a flag it refuses leaves nothing that a corrected rerun
    would be refused by; a log of only its header is started afresh with the new settings."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--score-flag nonsense: not a guided-diffusion create_model flag") as e:
        cli.main(argv(files, out, "--score-flag", "nonsense=1", max_images=1))
    assert "\n" not in str(e.value) and not list(out.glob("*.tsv")) and not list(out.glob("*.json"))
    log = out / "c__sigma_0.12.tsv"
    log.write_text(cl.HEADER)  # a kill before the first row, under other settings (no sidecar at all)
    assert cli.main(argv(files, out, max_images=1)) == 0
    assert len(rows_of(log)) == 1 and json.loads((out / "c__sigma_0.12.json").read_text())["settings"]["N"] == N


def test_table_and_summary_come_from_the_logs(files, tmp_path, monkeypatch, capsys):
    """Rows written into the logs (as an earlier run would have) are what the table, summary.json and the plot
    show: certified_accuracy of their radii, abstentions wrong, the best sigma per radius the max."""
    out = tmp_path / "out"
    assert cli.main(argv(files, out, sigma="0.12,0.25")) == 0
    written = {  # idx, label, predict, radius
        0.12: [(0, 7, 7, 0.61), (50, 8, 8, 0.3), (100, 5, -1, 0.0)],
        0.25: [(0, 7, 7, 1.2), (50, 8, 3, 0.9), (100, 5, 5, 0.0)],
    }
    for sigma, rows in written.items():
        (out / f"c__sigma_{sigma}.tsv").write_text(cl.HEADER + "".join(
            f"{i}\t{y}\t{p}\t{r!r}\t{int(p == y)}\t0:00:01.5\n" for i, y, p, r in rows))
    monkeypatch.setattr(cc, "resolve_score_model", lambda *a, **k: pytest.fail("a finished run loaded the model"))
    capsys.readouterr()
    assert cli.main(argv(files, out, sigma="0.12,0.25")) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["radii"] == list(cc.RADII)
    got = summary["classifiers"]["c"]
    per = {}
    for sigma, rows in written.items():
        ok = [p == y and p != -1 for _, y, p, _ in rows]
        per[sigma] = dk.certify.certified_accuracy([r for *_, r in rows], ok, cc.RADII)
        s = got["sigmas"][repr(sigma)]
        assert s["certified_accuracy"] == per[sigma]
        assert (s["images"], s["correct"], s["abstentions"]) == (3, sum(ok), sum(p == -1 for _, _, p, _ in rows))
    assert per[0.12] == pytest.approx([2 / 3, 1 / 3, 0, 0, 0, 0, 0])  # the hand count
    assert got["best"]["certified_accuracy"] == [max(a, b) for a, b in zip(per[0.12], per[0.25])]
    assert got["best"]["sigma"][:3] == [0.12, 0.12, 0.25]
    table = (out / "table.txt").read_text()
    assert table.strip() == summary["table"].strip() and summary["table"] in printed
    best_row = next(v for v in table.splitlines() if v.startswith("c ") and " best " in v)
    assert best_row.split()[2:] == ["66.7", "33.3", "33.3", "0.0", "0.0", "0.0", "0.0"]
    png = out / "certified_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert min(Image.open(png).size) > 100


def test_ctrl_c_finishes_the_image_and_says_how_to_continue(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = dk.certify.DenoisedSmoothing.certify
    calls = []

    def certify_then_ctrl_c(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # pressed while the first image is being certified
        return real(self, *a, **k)

    monkeypatch.setattr(dk.certify.DenoisedSmoothing, "certify", certify_then_ctrl_c)
    assert cli.main(argv(files, out)) == 130
    err = capsys.readouterr().err
    lines = [v for v in err.splitlines() if "diffaug certify" in v]
    assert len(lines) == 1 and "1 of 3 rows are saved" in lines[0] and "rerunning the same command continues" \
        in lines[0], err
    assert len(rows_of(out / "c__sigma_0.12.tsv")) == 1 and not (out / "summary.json").exists()
    assert cli.main(argv(files, out)) == 0
    assert [int(r[0]) for r in rows_of(out / "c__sigma_0.12.tsv")] == [0, 50, 100]


def test_default_score_model_on_digits(tmp_path, capsys):
    clf = classifier_checkpoint(tmp_path / "c.pt", num_classes=10, in_chans=1)
    out = tmp_path / "out"
    assert cli.main(["certify", "--classifier", clf, "--N0", "4", "--N", "8", "--batch", "8", "--max", "1",
                     "--sigma", "0.5", "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    assert len(rows_of(out / "c__sigma_0.5.tsv")) == 1
    st = json.loads((out / "c__sigma_0.5.json").read_text())["settings"]
    assert st["score_model"]["spec"] == "default" and st["dataset"] == ["digits", 32, 1]


BAD = [
    (["--sigma", "0"], "must be a finite number > 0"),
    (["--sigma", "-0.5"], "must be a finite number > 0"),
    (["--sigma", "0.25,x"], "'x'"),
    (["--sigma", "0.5,0.5"], "listed twice"),
    (["--sigma", ","], "no sigma"),
    (["--sigma", "100"], "--sigma 100: sigma = 100 is beyond this schedule's noise"),
    (["--N0", "0"], "--N0: must be a positive integer"),
    (["--N", "-3"], "--N: must be a positive integer"),
    (["--batch", "1.5"], "--batch: must be a positive integer"),
    (["--alpha", "0"], "--alpha: must be a number in (0, 1)"),
    (["--alpha", "1"], "--alpha: must be a number in (0, 1)"),
    (["--alpha", "nan"], "--alpha: must be a number in (0, 1)"),
    (["--skip", "0"], "--skip: must be a positive integer"),
    (["--max", "0"], "--max/--max-images: must be a positive integer"),
    (["--dtype", "int8"], "--dtype: invalid choice"),
    (["--dataset", "/no/such/folder"], "'/no/such/folder' is neither a known name"),
    (["--dataset", "cifar10:/no/such/cifar"], "CIFAR-10 folder not found at '/no/such/cifar'"),
    (["--dataset", "digits-c:all:3"], "data sets (digits-c:gaussian_noise:3"),
    (["--dataset", "digits-c:nope:3"], "unknown corruption"),
]


@pytest.mark.parametrize("more, msg", BAD)
def test_bad_options_are_one_line_before_any_model_loads(more, msg, tmp_path, monkeypatch, capsys):
    clf = classifier_checkpoint(tmp_path / "c.pt", num_classes=10, in_chans=1)
    monkeypatch.setattr(cc, "load_classifier", lambda *a, **k: pytest.fail("a classifier loaded"))
    monkeypatch.setattr(cc, "resolve_score_model", lambda *a, **k: pytest.fail("the score model loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["certify", "--classifier", clf, "--out", str(tmp_path / "out"), *more])
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and text.strip().count("\n") == 0 and "Traceback" not in text, text
    assert msg in text and "certify" in text, text
    assert not (tmp_path / "out").exists()


def test_paths_and_device_are_one_line(tmp_path, monkeypatch, capsys):
    clf = classifier_checkpoint(tmp_path / "c.pt", num_classes=10, in_chans=1)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(cc, "resolve_score_model", lambda *a, **k: pytest.fail("the score model loaded"))
    cases = [(["--classifier", clf, "--out", str(tmp_path / "file")], "--out"),
             (["--classifier", clf, "--out", str(tmp_path / "file" / "sub")], "lies under a file"),
             (["--classifier", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")], "not found"),
             (["--classifier", clf, "--out", str(tmp_path / "o"), "--image-size", "12", "--score-model", "default"],
              None)]
    for more, msg in cases[:3]:
        with pytest.raises(SystemExit) as e:
            cli.main(["certify", *more])
        assert msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit):  # --out is required: argparse's one line
        cli.main(["certify", "--classifier", clf])
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device"):
        cli.main(["certify", "--classifier", clf, "--out", str(tmp_path / "o"), "--device", "cuda"])


def test_a_bad_option_in_a_subprocess_prints_no_traceback(tmp_path):
    clf = classifier_checkpoint(tmp_path / "c.pt", num_classes=10, in_chans=1)
    rc, _, err = cli_subprocess("certify", "--classifier", clf, "--out", str(tmp_path / "out"), "--sigma",
                                "0.5,100")
    assert_one_line_failure(rc, err, "diffaug certify: error: --sigma 100")
    rc, _, err = cli_subprocess("certify", "--classifier", clf, "--out", str(tmp_path / "out"), "--alpha", "2")
    assert rc == 2
    assert_one_line_failure(rc, err, "--alpha: must be a number in (0, 1)")


def test_summary_of_a_partial_log_counts_only_its_rows(tmp_path):
    """summarize reads what is there: rows outside the asked indices are left out, missing ones counted."""
    path = tmp_path / "c__sigma_0.5.tsv"
    path.write_text(cl.HEADER + "0\t1\t1\t0.7\t1\t0:00:01\n50\t2\t-1\t0.0\t0\t0:00:01\n100\t3\t3\t2.2\t1\t0:00:01\n"
                    + "150\t1\t1\t9")
    s = cc.summarize({"c": {0.5: str(path)}}, [0, 50, 200])["classifiers"]["c"]["sigmas"]["0.5"]
    assert (s["images"], s["missing"], s["abstentions"], s["correct"]) == (2, 1, 1, 1)
    assert s["certified_accuracy"] == dk.certify.certified_accuracy([0.7, 0.0], [True, False], cc.RADII)
    assert np.isclose(s["certified_accuracy"][0], 0.5)


# ------------------------------------------------------------------------------------------------ torchrun
def numbers(summary):
    """summary.json without what names the run's folder."""
    for c in summary["classifiers"].values():
        for s in c["sigmas"].values():
            s.pop("log")
    return summary


def test_two_processes_write_what_one_writes_and_resume_across_world_sizes(files, tmp_path):
    """A 2-process gloo run writes the rows (time aside) and summary of one process, rank r taking the r-th of every
    2 of the indices a log lacks; one of its logs continues a 1-process --max 2 run. Then a refused rerun stops
    both ranks with one line."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(argv(files, one, sigma="0.12,0.25", max_images=4)) == 0
    assert cli.main(argv(files, two, sigma="0.25", max_images=2)) == 0
    rc, out, err = torchrun(*argv(files, two, sigma="0.12,0.25", max_images=4))
    assert rc == 0, out[-3000:] + err[-3000:]
    for sigma in ("0.12", "0.25"):
        assert rows_of(two / f"c__sigma_{sigma}.tsv") == rows_of(one / f"c__sigma_{sigma}.tsv")
    assert numbers(json.loads((two / "summary.json").read_text())) == \
        numbers(json.loads((one / "summary.json").read_text()))
    assert (two / "table.txt").read_text() == (one / "table.txt").read_text()
    assert out.count("certified accuracy (%)") == 1, out  # rank 0 alone speaks
    assert "4 images to certify by 2 processes" in out and "2 images to certify by 2 processes" in out, out
    done = [line.split("]")[0] + " " + line.split()[-11] for line in out.splitlines() if "| rank " in line]
    assert done == ["[c | sigma 0.12 | rank 0 0", "[c | sigma 0.12 | rank 1 50", "[c | sigma 0.12 | rank 0 100",
                    "[c | sigma 0.12 | rank 1 150", "[c | sigma 0.25 | rank 0 100", "[c | sigma 0.25 | rank 1 150"], out
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no rank file left
    rc, out, err = torchrun(*argv(files, two, "--alpha", "0.01", sigma="0.12,0.25", max_images=4))
    assert rc != 0 and "diffaug_kernels/" not in err, err[-3000:]  # torchrun's own traceback only, no rank's
    said = [line for line in (out + err).splitlines() if "diffaug certify: error" in line]
    assert len(said) == 1 and "alpha: 0.1 there, 0.01 now" in said[0], out + err


def test_rank_files_of_a_killed_run_are_merged(files, tmp_path, capsys):
    """A run killed with rows in rank files (of any world size; a partial last line; a row both there and in the log,
    as a merge killed before it removed them leaves it) is continued by the next run: one row per index, sorted,
    the rows of an uninterrupted run, no rank file left. Different rows for one index, or one index twice in a file,
    are refused with every file left as is."""
    fresh, killed = tmp_path / "fresh", tmp_path / "killed"
    assert cli.main(argv(files, fresh, max_images=4)) == 0
    want = (fresh / "c__sigma_0.12.tsv").read_text().splitlines(keepends=True)  # header, rows 0, 50, 100, 150
    killed.mkdir()
    shutil.copy(fresh / "c__sigma_0.12.json", killed / "c__sigma_0.12.json")
    log = killed / "c__sigma_0.12.tsv"
    ranks = {0: [want[3], want[1], want[4][:5]], 1: [want[2]], 3: [want[1]]}

    def kill_state():
        log.write_text(want[0] + want[1])
        for r, rows in ranks.items():
            (killed / f"c__sigma_0.12.tsv.rank{r}").write_text(want[0] + "".join(rows))

    def refused(*fragments):
        before = {p.name: p.read_bytes() for p in killed.iterdir()}
        with pytest.raises(SystemExit) as e:
            cli.main(argv(files, killed, max_images=4))
        assert all(f in str(e.value) for f in fragments) and "\n" not in str(e.value), str(e.value)
        assert {p.name: p.read_bytes() for p in killed.iterdir()} == before

    kill_state()
    (killed / "c__sigma_0.12.tsv.rank1").write_text(want[0] + want[2].replace("50\t", "51\t", 1))
    refused("rank1 holds a row for image 51 which these settings never take")
    (killed / "c__sigma_0.12.tsv.rank1").write_text(want[0] + want[2] + want[2])
    refused("rank1 holds a row for image 50 twice")
    other = want[1].split("\t")
    other[3] = "9.5"
    (killed / "c__sigma_0.12.tsv.rank1").write_text(want[0] + "\t".join(other))
    refused("c__sigma_0.12.tsv and", "rank1 hold different rows for image 0")
    kill_state()
    capsys.readouterr()
    assert cli.main(argv(files, killed, max_images=4)) == 0
    assert "1 images to certify" in capsys.readouterr().out  # 150: its rank 0 row was cut short
    assert rows_of(log) == rows_of(fresh / "c__sigma_0.12.tsv")
    assert log.read_text().splitlines()[1:4] == [v.rstrip("\n") for v in want[1:4]]  # the rows kept as written
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in fresh.iterdir())


def test_ctrl_c_under_torchrun_stops_every_rank_after_one_step(files, tmp_path, capsys):
    """torchrun passes Ctrl-C to each rank: both finish the image at hand, their rows are merged (two per step) and
    rank 0 says how to continue; a 1-process rerun then ends with the rows of an uninterrupted run."""
    out, fresh = tmp_path / "two", tmp_path / "fresh"
    args = argv(files, out, "--skip", "5", max_images=30)
    p = subprocess.Popen(torchrun_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    try:
        start = time.time()
        while not all((out / f"c__sigma_0.12.tsv.rank{r}").exists() for r in (0, 1)):  # both ranks at work
            assert p.poll() is None and time.time() - start < 150, "torchrun ended before certifying"
            time.sleep(0.02)
        p.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    said = [line for line in stderr.splitlines() if line.startswith("diffaug certify: stopped; ")]
    assert len(said) == 1 and "rows are saved" in said[0], stdout[-2000:] + stderr[-3000:]
    assert sorted(v.name for v in out.iterdir()) == ["c__sigma_0.12.json", "c__sigma_0.12.tsv"]
    stopped = rows_of(out / "c__sigma_0.12.tsv")
    assert 0 < len(stopped) < 30 and len(stopped) % 2 == 0, stopped
    assert [int(r[0]) for r in stopped] == list(range(0, 5 * len(stopped), 5))
    capsys.readouterr()
    assert cli.main(args) == 0
    assert f"{30 - len(stopped)} images to certify" in capsys.readouterr().out
    assert cli.main(argv(files, fresh, "--skip", "5", max_images=30)) == 0
    assert rows_of(out / "c__sigma_0.12.tsv") == rows_of(fresh / "c__sigma_0.12.tsv")


def test_multistep_denoiser_rows_are_the_librarys(files, tmp_path, capsys):
    """--denoiser multistep: the log's row is DenoisedSmoothing(denoiser="multistep")'s CERTIFY on the image's
    seed, and the sidecar records the denoiser (the one-step default is left out, so older logs continue)."""
    out = tmp_path / "out"
    assert cli.main(argv(files, out, "--denoiser", "multistep", sigma="0.02", max_images=1)) == 0
    (row,) = rows_of(out / "c__sigma_0.02.tsv")
    assert json.loads((out / "c__sigma_0.02.json").read_text())["settings"]["denoiser"] == "multistep"
    clf = classifier.load_classifier(files["clf"], "cpu")
    x, y = dk.data.digits("test", SIZE, 1)[0]
    sm = dk.certify.DenoisedSmoothing(clf, files["model"], dk.NoiseSchedule.linear(1000), 0.02, 10,
                                      denoiser="multistep")
    label, radius = sm.certify(x, N0, N, ALPHA, BATCH, seed=cc.image_seed(0, 0, 0.02))
    assert row[:4] == ("0", str(int(y)), str(label), repr(radius))
