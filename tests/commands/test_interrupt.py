"""Ctrl-C (SIGINT) in the long commands, as a user presses it in a real process: the training commands stop at a
step, leave a checkpoint that verifies and say in one line where it is; evaluate keeps its finished results; no
traceback anywhere; a second Ctrl-C stops at once."""
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from helpers import CLI_ENV, classifier_checkpoint

from diffaug_kernels import utils
from diffaug_kernels.commands import train_classifier as tc
from diffaug_kernels.commands import train_score

TINY_SCORE = ["--model", "image_size=16", "--model", "num_res_blocks=1", "--model", "channel_mult=1",
              "--model", "attention_resolutions=", "--model", "num_channels=32"]


def interrupt(argv, ready, timeout=240):
    """Runs `python -m diffaug_kernels ARGV`, sends SIGINT once a line of its stdout satisfies ready(line), and
    returns (exit status, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "diffaug_kernels", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    lines, err = [], []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)  # a full stderr pipe blocks
    reader.start()
    try:
        for line in p.stdout:
            lines.append(line)
            if ready(line):
                p.send_signal(signal.SIGINT)
                break
        p.wait(timeout=timeout)
        rest = p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(timeout=10)
    return p.returncode, "".join(lines) + (rest or ""), "".join(err)


def one_line_message(stderr_or_stdout: str, word: str) -> str:
    hits = [line for line in stderr_or_stdout.splitlines() if word in line]
    assert len(hits) == 1, stderr_or_stdout[-2000:]
    return hits[0]


def test_train_score_ctrl_c_leaves_a_verified_checkpoint(tmp_path):
    out = tmp_path / "run"
    rc, stdout, stderr = interrupt(["train-score", *TINY_SCORE, "--steps", "100000", "--batch-size", "4",
                                    "--log-every", "1", "--save-every", "100000", "--threads", "1", "--no-progress",
                                    "--out", str(out), "--export", str(tmp_path / "m.safetensors")],
                                   ready=lambda line: line.startswith("step 2/"))
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "Ctrl-C: saving a checkpoint after this step" in stderr
    msg = one_line_message(stdout, "interrupted at step")
    step = int(msg.split("interrupted at step ")[1].split()[0])
    assert step >= 2 and "(not exported)" in msg and not (tmp_path / "m.safetensors").exists()
    path = out / f"ckpt_{step:07d}.pt"
    assert str(path) in msg and utils.checksum_ok(path) is True
    assert train_score.load_checkpoint(str(out))["step"] == step  # --resume DIR takes it
    assert [json.loads(v)["step"] for v in (out / "log.jsonl").read_text().splitlines()] == list(range(1, step + 1))


def test_train_classifier_ctrl_c_leaves_a_verified_checkpoint(tmp_path):
    out = tmp_path / "run"
    rc, stdout, stderr = interrupt(["train-classifier", "--data", "digits", "--image-size", "16", "--model",
                                    "test_resnet", "--batch-size", "8", "--steps", "100000", "--threads", "1",
                                    "--log-interval", "1", "--no-diffaug", "--out", str(out)],
                                   ready=lambda line: line.startswith("step 2/"))
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    msg = one_line_message(stdout, "interrupted at step")
    step = int(msg.split("interrupted at step ")[1].split()[0])
    ckpt = out / tc.CHECKPOINT_NAME
    assert step >= 2 and f"checkpoint {ckpt}; continue with --resume" in msg
    assert utils.checksum_ok(ckpt) is True and utils.torch_load(str(ckpt), "classifier")["global_step"] == step


def test_evaluate_ctrl_c_keeps_the_finished_results(tmp_path):
    clf = classifier_checkpoint(tmp_path / "c.pt", num_classes=10, in_chans=1)
    out = tmp_path / "out"
    rc, stdout, stderr = interrupt(["evaluate", "--classifier", clf, "--modes", "Default,DE", "--datasets",
                                    "digits,digits-c:all:3", "--no-progress", "--threads", "1", "--out", str(out),
                                    "--score-model", "random", "--score-config", "digits32", "--score-flag",
                                    "num_channels=32", "--score-flag", "num_res_blocks=1", "--score-flag",
                                    "channel_mult=1", "--score-flag", "attention_resolutions=", "--max-images", "64"],
                                   ready=lambda line: line.startswith("[c | digits]"))
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    msg = one_line_message(stderr, "interrupted")
    assert f"the finished results are in {out}/" in msg
    assert json.loads((out / "c__digits.json").read_text())["acc"]["DE"] is not None


def test_stop_request_sets_once_then_interrupts(capsys):
    """The first SIGINT is a request the loop reads; the second raises at once; the old handler comes back."""
    before = signal.getsignal(signal.SIGINT)
    with utils.StopRequest("stopping") as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and "Ctrl-C: stopping" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_request_outside_the_main_thread_is_inert():
    seen = []

    def run():
        with utils.StopRequest() as stop:
            seen.append(stop.requested)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [False]
