"""`python -m diffaug_kernels demo`: DiffAug end to end on scikit-learn's digits, on a CPU, in under 10 minutes.

1. the augmentation grid (augmentation_grid.png): test digits, then DiffAug samples at t = 350, 400, ..., 700
   with the shipped score model (dk.load_default_score_model), as the paper's figure;
2. trains the same small timm classifier twice with the train-classifier command (same seed, data order and steps):
   without DiffAug (CE on clean images) and with it (CE clean + CE DiffAug'd, t ~ U{0..999});
3. evaluates both with dk.robustness in the four modes of the paper's table (Default, DE, DDA, DDA-SE) on the
   clean test split and on corrupted copies (dk.data.corruptions with the ImageNet-C constants: the CIFAR-10-C ones
   leave the smooth, upsampled 8x8 digits nearly intact, 94-98% accuracy at severity 5 for noise and blur,
   while ImageNet-C's gaussian/impulse noise at 5 and gaussian blur at 3 bring the plain classifier to about
   40-50%); DDA runs on fewer images
   (it costs ~25-50 guided model passes per image) and with half the published respaced steps at the same
   noise level by default (50 steps, depth 25 = t 505 -> 0, as DDA's 100 / 50);
4. the entropy analysis (entropy_vs_t.png): mean prediction entropy of both classifiers on DiffAug samples of
   test digits against t = 0..999;
5. certified L2 robustness of both by diffusion denoised smoothing (the `certify` command: certify/, with its
   table and certified_accuracy.png), on a few test digits with small N at two sigmas;
6. perceptually aligned gradients of both (the `pag` command's analysis: pag/, with pag_grid.png and
   alignment_vs_t.png): input gradients through the denoiser, their cosine with the Bayes direction of the
   training digits at a few t, and accuracy under L2 PGD;
7. classifier guidance (guidance/): the shipped noisy classifier and DA-classifier (train-guidance's default
   recipe for the shipped score model; with another score model both are trained here), their accuracy on noisy
   test digits, then DDIM samples from one x_T, unguided and guided to each digit by each, scored by the
   no-DiffAug classifier (on-target accuracy, Inception-style score of its softmax) and by digits-feature
   metrics (dk.metrics on its penultimate features against the test digits': Frechet distance, precision /
   recall, density / coverage; not FID, whose features are Inception's), with a sample grid for each;
8. results.json (everything above, settings and the time of each phase) and the printed tables.

This is a scaled-down demonstration, not a reproduction of the paper's ImageNet numbers: a 1,800-image
8x8-upsampled dataset, a few epochs, a small score model, a few hundred test images (a 1-image difference is
0.3-0.5 points; DDA's columns, on fewer images, are noisier still). Whatever the numbers say is printed as is:
at this scale DiffAug training and DE need not beat the baseline.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import time
from typing import Optional

import torch

from .. import metrics, robustness, sampling
from ..augment import DiffAug
from ..bench import plots
from ..data import digits
from ..data.eval_sets import parse_datasets
from ..models import ADM_CONFIGS
from ..models.classifier import load_classifier
from ..models.guidance import GUIDANCE_KINDS, load_default_guidance_classifier, load_guidance_classifier
from ..models.score import load_default_score_model
from ..ops import philox_normal
from ..robustness import stream_seed
from ..schedule import NoiseSchedule
from ..utils import UsageError, read_json, torch_load, write_json
from . import certify as certify_cmd
from . import pag as pag_cmd
from . import sample as sample_cmd
from . import train_classifier as tc
from . import train_guidance as tg
from .options import Parser, positive, seed

NAME = "demo"
HELP = "DiffAug end to end on the digits: train with/without, evaluate, plots"
DESCRIPTION = ("Trains a small timm classifier on scikit-learn's digits with and without DiffAug (the shipped score "
               "model), evaluates Default / DE / DDA / DDA-SE on clean and corrupted test images, certifies both by "
               "denoised smoothing, measures their perceptually aligned gradients (pag), samples digits guided by "
               "the shipped noisy and DA guidance classifiers, prints the tables and writes results.json and the "
               "plots. About 6.1 minutes (367 s) "
               "measured on 2 CPU cores with the default threads, every part included (README.md); "
               "--quick for a smoke run.")

DEFAULTS = dict(model="resnet10t", epochs=5, batch_size=64, lr=0.05, eval_images=200, dda_images=32, dda_steps=50,
                dda_depth=25, corruptions=("gaussian_noise:5:imagenet", "impulse_noise:5:imagenet",
                                                "gaussian_blur:3:imagenet"),
                entropy_images=128, entropy_times=tuple(range(0, 1000, 50)) + (999,), grid_images=6,
                de_times=tuple(range(0, 451, 50)), cert_images=12, cert_sigmas=(0.25, 0.5), cert_n0=10, cert_n=100,
                cert_batch=110, pag_images=32, pag_times=(300, 400, 500, 600), pag_grid=3, pag_pgd_images=100,
                pag_eps=(0.25, 0.5, 1.0), pag_steps=7, guide_steps=150, guide_batch=16, guide_eval_images=128,
                guide_eval_times=(0, 250, 500), guide_per_label=5, guide_ddim=10, guide_scale=6.0)
QUICK = dict(model="test_resnet", epochs=1, batch_size=32, lr=0.05, eval_images=16, dda_images=4, dda_steps=10,
             dda_depth=3, corruptions=("gaussian_noise:5",), entropy_images=8, entropy_times=(0, 500, 999),
             grid_images=2, de_times=(0, 200, 400), limit_train=96, cert_images=2, cert_sigmas=(0.5,), cert_n0=4,
             cert_n=16, cert_batch=16, pag_images=4, pag_times=(300, 900), pag_grid=1, pag_pgd_images=4,
             pag_eps=(0.5,), pag_steps=2, guide_steps=2, guide_batch=8, guide_eval_images=8,
             guide_eval_times=(0, 500), guide_per_label=1, guide_ddim=2, guide_scale=4.0)
# the untrained stand-in score model of --score-model random (smoke runs and tests only)
RANDOM_UNET_FLAGS = dict(num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="",
                         resblock_updown=False)


# train_classifier arguments that make a finished checkpoint in --out reusable
_SAME_RUN = ("model", "epochs", "batch_size", "lr", "seed", "limit_train", "no_diffaug", "score_model", "score_flag")


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and counts: a smoke run of every piece")
    p.add_argument("--epochs", type=positive, default=None, help="classifier epochs (default 5; --quick 1)")
    p.add_argument("--model", default=None, help="timm classifier (default resnet10t; --quick test_resnet)")
    p.add_argument("--eval-images", type=positive, default=None,
                   help="test images per dataset for Default and DE (default 200 of the 360 in the digits test split)")
    p.add_argument("--dda-images", type=positive, default=None,
                   help="test images per dataset for DDA / DDA-SE (default 32: DDA is the slow mode)")
    p.add_argument("--corruptions", default=None,
                   help="comma list of corruption:severity[:preset] (default gaussian_noise:5:imagenet,"
                        "impulse_noise:5:imagenet,gaussian_blur:3:imagenet)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the training, the noise and the image subsets")
    p.add_argument("--threads", type=positive, default=None,
                   help="torch.set_num_threads (default: torch's); on a machine busy with other jobs --threads 1 "
                        "avoids oversubscription (measured: several times faster there)")
    p.add_argument("--score-model", default="default",
                   help="'default' (the shipped digits model) or 'random' (an untrained tiny UNet: smoke runs only)")


def _say(msg: str) -> None:
    print(msg, flush=True)


def demo_score_model(spec: str, out: str, seed: int):
    """-> (model, schedule, train_classifier flags that load the same model)."""

    if spec == "default":
        try:
            model, schedule = load_default_score_model()
        except FileNotFoundError as e:
            raise SystemExit(f"diffaug demo: {e}\n(`--score-model random` runs the pipeline with an untrained "
                             f"score model, for smoke tests only)") from None
        return model.eval().requires_grad_(False), schedule, ["--score-model", "default"]
    if spec == "random":
        torch.manual_seed(seed)
        cfg = ADM_CONFIGS["digits32"].replace(**RANDOM_UNET_FLAGS)
        model = cfg.create().eval().requires_grad_(False)
        path = os.path.join(out, "random_unet.pt")
        torch.save(model.state_dict(), path)
        flags = ["--score-model", path, "--score-config", "digits32"]
        for k, v in RANDOM_UNET_FLAGS.items():
            flags += ["--score-flag", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        return model, NoiseSchedule.linear(1000), flags
    raise SystemExit(f"diffaug demo: --score-model must be 'default' or 'random', got {spec!r}")


def _train(name: str, out: str, s: dict, score_flags: list, diffaug: bool, seed: int, threads: Optional[int]):
    run_dir = os.path.join(out, name)
    argv = ["--data", "digits", "--model", s["model"], "--epochs", str(s["epochs"]), "--batch-size",
            str(s["batch_size"]), "--lr", str(s["lr"]), "--seed", str(seed), "--out", run_dir, "--resume",
            "--no-val", "--log-interval", "5", "--device", "cpu"]
    if s.get("limit_train"):
        argv += ["--limit-train", str(s["limit_train"])]
    if threads:
        argv += ["--threads", str(threads)]
    argv += score_flags if diffaug else ["--no-diffaug"]
    args = tc.build_parser().parse_args(argv)
    ck = os.path.join(run_dir, tc.CHECKPOINT_NAME)
    if os.path.isfile(ck):
        try:
            done = torch_load(ck, "train_classifier")
            if not isinstance(done, dict):
                raise UsageError(f"{ck} is not a train_classifier checkpoint (it holds a {type(done).__name__})")
            same = all(done.get("args", {}).get(k) == tc.jsonable(getattr(args, k)) for k in _SAME_RUN)
        except UsageError as e:  # damaged or foreign: what it held is lost, so train afresh
            _say(f"[train {name}] {e}: retraining")
            done, same = {}, False
        if same and done.get("global_step") == done.get("total_steps"):
            _say(f"[train {name}] already trained ({ck}): reused")
            return load_classifier(ck), ck
        if not same:  # another configuration (or a damaged file) is here: start this one afresh
            if done:
                _say(f"[train {name}] {ck} was trained with other settings: retraining")
            for f in (ck, os.path.join(run_dir, tc.LOG_NAME)):
                if os.path.isfile(f):
                    os.remove(f)
    _say(f"[train {name}] {' '.join(argv)}")
    tc.train(args)
    return load_classifier(ck), ck


def run(out: str = "demo_out", quick: bool = False, seed: int = 0, score_model: str = "default",
        threads: Optional[int] = None, **overrides) -> dict:
    """The whole demo; returns what results.json holds. threads: torch.set_num_threads for the run (on a
    machine shared with other jobs, 1 thread per process can be several times faster than oversubscribing)."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(out, quick, seed, score_model, threads, overrides)
    finally:
        torch.set_num_threads(old_threads)


def _run(out, quick, seed, score_model, threads, overrides) -> dict:

    s = dict(QUICK if quick else DEFAULTS)
    s.update({k: v for k, v in overrides.items() if v is not None})
    # the data sets first: a bad --corruptions must fail now, not after minutes of training
    specs = ["digits"] + [f"digits-c:{c}" for c in s["corruptions"]]
    datasets = parse_datasets(specs)
    os.makedirs(out, exist_ok=True)
    times = {}
    t_all = time.time()
    _say(f"diffaug demo: digits, {'QUICK smoke settings' if quick else 'full settings'}, "
         f"{torch.get_num_threads()} thread(s), output in {out}/")

    # 0. the score model
    model, schedule, score_flags = demo_score_model(score_model, out, seed)
    aug = DiffAug(model, schedule, prediction=getattr(model, "prediction", "eps"))
    test = digits("test", 32, 1)
    x_test = test.tensors[0]

    # 1. the augmentation grid
    t0 = time.time()
    grid_path = plots.augmentation_grid(aug, x_test[:s["grid_images"]], os.path.join(out, "augmentation_grid.png"),
                                        seed=seed)
    times["grid_s"] = round(time.time() - t0, 1)
    _say(f"[grid] {grid_path} ({s['grid_images']} digits x t = 350..700) in {times['grid_s']}s")

    # 2. the two classifiers
    t0 = time.time()
    plain, plain_ck = _train("no-diffaug", out, s, score_flags, False, seed, threads)
    times["train_no_diffaug_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    withda, da_ck = _train("diffaug", out, s, score_flags, True, seed, threads)
    times["train_diffaug_s"] = round(time.time() - t0, 1)
    _say(f"[train] no DiffAug {times['train_no_diffaug_s']}s, DiffAug {times['train_diffaug_s']}s")
    classifiers = [("no DiffAug", plain.eval()), ("DiffAug", withda.eval())]

    # 3. the evaluation table
    t0 = time.time()
    cfg = robustness.EvalConfig(modes=robustness.MODES, batch_size=64, max_images=s["eval_images"],
                        dda_max_images=s["dda_images"],
                        de_times=tuple(s["de_times"]), dda_steps=s["dda_steps"], dda_depth=s["dda_depth"],
                        image_size=32, seed=seed, device="cpu", progress=True,
                        extra={"score_model": score_model},
                        # retrained classifiers invalidate finished evaluations
                        identities={"no DiffAug": robustness.file_identity(plain_ck),
                                    "DiffAug": robustness.file_identity(da_ck)})
    res = robustness.run(classifiers, aug, datasets, cfg, out=os.path.join(out, "eval"), log=_say)
    times["evaluate_s"] = round(time.time() - t0, 1)

    # 4. the entropy analysis
    t0 = time.time()
    xe = x_test[:s["entropy_images"]]
    ts = list(s["entropy_times"])
    ent = plots.entropy_vs_t(dict(classifiers), aug, xe, ts, seed=seed,
                             progress=lambda k: _say(f"[entropy] t = {ts[k]} ({k + 1}/{len(ts)})")
                             if k % 5 == 4 or k == len(ts) - 1 else None)
    ent_path = plots.plot_lines({n: (ts, v) for n, v in ent.items()}, os.path.join(out, "entropy_vs_t.png"),
                                title=f"Mean prediction entropy on DiffAug samples ({len(xe)} test digits)",
                                xlabel="diffusion time t", ylabel="entropy (nats)", hline=(math.log(10), "uniform"))
    times["entropy_s"] = round(time.time() - t0, 1)
    _say(f"[entropy] {ent_path} in {times['entropy_s']}s")

    # 5. certification by denoised smoothing
    t0 = time.time()
    cert = _certify(os.path.join(out, "certify"), s, score_flags, {"no-diffaug": plain_ck, "diffaug": da_ck}, seed,
                    threads)
    times["certify_s"] = round(time.time() - t0, 1)
    _say(f"[certify] {cert['plot']} in {times['certify_s']}s")

    # 6. perceptually aligned gradients
    t0 = time.time()
    pg = pag_cmd.run({"no-diffaug": plain, "diffaug": withda}, aug, os.path.join(out, "pag"), times=s["pag_times"],
                     images=s["pag_images"], grid_images=s["pag_grid"], eps=s["pag_eps"],
                     pgd_images=s["pag_pgd_images"], pgd_steps=s["pag_steps"], batch_size=64, seed=seed,
                     progress=False, log=_say)
    times["pag_s"] = round(time.time() - t0, 1)
    _say(f"[pag] {pg['files']['grid']} in {times['pag_s']}s")

    # 7. classifier guidance: noisy against DA classifier
    t0 = time.time()
    guide = _guidance(os.path.join(out, "guidance"), s, score_flags, model, schedule, plain, x_test, seed)
    times["guidance_s"] = round(time.time() - t0, 1)
    _say(f"[guidance] {guide['files']['json']} in {times['guidance_s']}s")

    times["total_s"] = round(time.time() - t_all, 1)
    result = {
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "quick": quick, "seed": seed, "score_model": score_model, "threads": torch.get_num_threads(),
        "accuracy": {c: {d: r["acc"] for d, r in by.items()} for c, by in res["results"].items()},
        "images": {c: {d: r["n"] for d, r in by.items()} for c, by in res["results"].items()},
        "entropy_vs_t": {"t": ts, **ent, "uniform": math.log(10)},
        "certified_accuracy": cert["accuracy"], "certify_radii": cert["radii"],
        "pag": {"alignment": pg["alignment"], "robust_accuracy": pg["robust_accuracy"]},
        "guidance": {k: guide[k] for k in ("classifiers", "samples")},
        "files": {"grid": grid_path, "entropy": ent_path, "eval": os.path.join(out, "eval"),
                  "certify": os.path.join(out, "certify"), "certified_accuracy": cert["plot"],
                  "pag_grid": pg["files"]["grid"], "pag_alignment": pg["files"]["alignment"],
                  "guidance": guide["files"]},
        "times": times, "table": res["table"],
    }
    write_json(result, os.path.join(out, "results.json"))
    _say("")
    _say(res["table"])
    _say("")
    _say(cert["table"])
    _say("")
    _say(pag_cmd.format_table(pg))
    _say("")
    _say(guide["table"])
    _say("")
    _say(_summary(result))
    _say(f"\ntimes (s): {times}\nwritten: {out}/results.json, {grid_path}, {ent_path}, {out}/eval/")
    return result


def _certify(out: str, s: dict, score_flags: list, checkpoints: dict, seed: int, threads: Optional[int]) -> dict:
    """Both classifiers through the certify command: every (360 // cert_images)-th test digit, N0 / N draws at
    each sigma. Its logs resume; after a classifier, the score-model file or these settings change they start
    afresh (the command refuses logs made otherwise, rightly: here they are the demo's own output)."""
    argv = [arg for n, p in checkpoints.items() for arg in ("--classifier", f"{n}={p}")]
    argv += ["--dataset", "digits", "--sigma", ",".join(str(v) for v in s["cert_sigmas"]), "--N0", str(s["cert_n0"]),
             "--N", str(s["cert_n"]), "--alpha", "0.001", "--batch", str(s["cert_batch"]), "--skip",
             str(360 // s["cert_images"]), "--max", str(s["cert_images"]), "--image-size", "32", "--seed", str(seed),
             "--device", "cpu", "--out", out, "--no-progress", *score_flags]
    stamp = os.path.join(out, "demo_models.json")
    spec = score_flags[1]  # --score-model's value: 'default' or the file the demo wrote
    ids = {"classifiers": {n: robustness.file_identity(p) for n, p in checkpoints.items()},
           "score_model": robustness.file_identity(spec) if os.path.isfile(spec) else spec, "argv": argv}
    if os.path.isdir(out) and read_json(stamp) != ids:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    write_json(ids, stamp)
    if threads:
        argv += ["--threads", str(threads)]
    parser = Parser(prog="diffaug certify")
    certify_cmd.add_arguments(parser)
    _say(f"[certify] diffaug certify {' '.join(argv)}")
    if certify_cmd.main(parser.parse_args(argv)) != 0:
        raise KeyboardInterrupt  # Ctrl-C stopped it; its rows are kept and a rerun continues
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    acc = {n: {**{f"sigma {float(k):g}": v["certified_accuracy"] for k, v in c["sigmas"].items()},
               "best": c["best"]["certified_accuracy"]} for n, c in summary["classifiers"].items()}
    return {"accuracy": acc, "radii": summary["radii"], "table": summary["table"],
            "plot": os.path.join(out, "certified_accuracy.png")}


def _score_options(score_flags: list) -> dict:
    """train-guidance's score-model options from the train-classifier flags that load the demo's score model."""
    opts = {"score_model": None, "score_config": None, "score_flag": []}
    for k in range(0, len(score_flags), 2):
        name, value = score_flags[k].removeprefix("--").replace("-", "_"), score_flags[k + 1]
        if name == "score_flag":
            opts["score_flag"].append(value)
        else:
            opts[name] = value
    return opts


def _trained_guidance_classifier(out: str, kind: str, s: dict, score_flags: list, seed: int, model):
    """A train-guidance classifier of `kind` trained in out/<kind> for a score model other than the shipped one
    (reused when its checkpoint has these settings and all its steps; an interrupted run continues)."""
    run_dir = os.path.join(out, kind)
    opts = dict(kind=kind, steps=s["guide_steps"], batch_size=s["guide_batch"], seed=seed, eval_times=[],
                **_score_options(score_flags))
    resume = run_dir if glob.glob(os.path.join(run_dir, "ckpt_*.pt")) else None
    _say(f"[guidance] train-guidance --kind {kind} --steps {opts['steps']} --batch-size {opts['batch_size']} "
         f"--out {run_dir}" + (" (continuing)" if resume else ""))
    try:
        summary = tg.train(resume=resume, out=run_dir, device="cpu", keep=1, progress=False, **opts)
    except (UsageError, ValueError) as e:  # a checkpoint of other settings, or a damaged one: start afresh
        _say(f"[guidance] {e}: retraining")
        shutil.rmtree(run_dir)
        summary = tg.train(out=run_dir, device="cpu", keep=1, progress=False, **opts)
    if summary["interrupted"]:
        raise KeyboardInterrupt  # its checkpoint is kept and a rerun continues
    return load_guidance_classifier(summary["checkpoint"], score_model=model)


def _guidance(out: str, s: dict, score_flags: list, model, schedule, judge, x_test, seed: int) -> dict:
    """Part 7. The guidance classifiers: with the shipped score model, the shipped noisy and DA classifiers
    (dk.models.load_default_guidance_classifier: train-guidance's default recipe, 500 steps each, too long for
    the demo's budget); with another score model, both trained here alike (guide_steps). Their accuracy on x_t
    of the first guide_eval_images test digits; then DDIM samples from one x_T, unguided and guided by each to
    every digit (guide_per_label each), judged by `judge` (the no-DiffAug classifier): its accuracy on the
    targets, the Inception-style score of its softmax, and dk.metrics on its penultimate features against the
    test digits' (digits-feature metrics, not FID)."""
    shipped = score_flags[1] == "default"
    stamp = os.path.join(out, "demo_models.json")
    ids = {"score_model": score_flags[1] if shipped else robustness.file_identity(score_flags[1]),
           "steps": None if shipped else s["guide_steps"]}
    if os.path.isdir(out) and read_json(stamp) != ids:  # another score model: its classifiers are stale
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    write_json(ids, stamp)
    classifiers, accuracy = {}, {}
    test_ds = digits("test", x_test.shape[-1], x_test.shape[1])
    for kind in GUIDANCE_KINDS:
        clf = (load_default_guidance_classifier(kind, score_model=model) if shipped
               else _trained_guidance_classifier(out, kind, s, score_flags, seed, model))
        classifiers[kind] = clf
        accuracy[kind] = tg.noisy_accuracy(clf, test_ds, schedule, s["guide_eval_times"], seed, 64,
                                           s["guide_eval_images"])
    n = 10 * s["guide_per_label"]
    y = torch.arange(10).repeat(s["guide_per_label"])
    x_T = philox_normal((n, *x_test.shape[1:]), stream_seed(seed, "guidance"), 0)
    penultimate = _Penultimate(judge).eval()
    real = metrics.features(penultimate, x_test)
    prediction = getattr(model, "prediction", "eps")
    rows, files, samples = {}, {"json": os.path.join(out, "guidance.json")}, {}
    for name, clf in (("unguided", None), *classifiers.items()):
        t0 = time.time()
        x = sampling.ddim_sample(model, schedule, x_T, s["guide_ddim"], prediction=prediction, classifier=clf,
                                 classifier_scale=s["guide_scale"], y=y if clf is not None else None).clamp(-1, 1)
        with torch.no_grad():
            probs = torch.softmax(judge(x).float(), dim=1)
        rows[name] = {"on_target": float((probs.argmax(1) == y).float().mean()),
                      "score": metrics.inception_score(probs.numpy(), splits=1),
                      **metrics.feature_metrics(real, metrics.features(penultimate, x)),
                      "sample_s": round(time.time() - t0, 1)}
        files[name] = sample_cmd.grid(sample_cmd.to_uint8(x), os.path.join(out, f"{name}.png"), y.numpy())
        samples[name] = x
    files["grid"] = _guidance_grid(samples, y, os.path.join(out, "guidance_grid.png"))
    info = {"classifiers": {k: {"source": "shipped" if shipped else "trained",
                                "steps": c.guidance_info["step"],
                                "accuracy_on_x_t": {str(t): a for t, a in accuracy[k].items()}}
                            for k, c in classifiers.items()},
            "samples": rows,
            "settings": {"per_label": s["guide_per_label"], "ddim_steps": s["guide_ddim"], "scale": s["guide_scale"],
                         "eval_images": min(s["guide_eval_images"], len(test_ds)),
                         "judge": "the no-DiffAug demo classifier", "real_images": len(x_test)}}
    write_json({**info, "files": files}, files["json"])
    return {**info, "files": files, "table": _guidance_table(info)}


def _guidance_grid(samples: dict, y, path: str) -> str:
    """One picture: a row per digit, each method's samples of it side by side (a white tile between methods);
    column k of every block starts from the same x_T."""
    blank = torch.ones_like(next(iter(samples.values()))[0])
    rows = []
    for d in range(10):
        row = []
        for x in samples.values():
            row += [*x[y == d], blank]
        rows.append(row[:-1])
    per = int((y == 0).sum())
    headers = []
    for name in samples:
        headers += [{"unguided": "unguided", "noisy": "noisy classifier", "da": "DA-classifier"}.get(name, name)]
        headers += [""] * per
    return plots.save_image_grid(rows, path, headers=headers[:-1])


class _Penultimate(torch.nn.Module):
    """A classifier's pooled features (NormalizedClassifier.penultimate) as a module, for dk.metrics.features."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier.penultimate(x)


def _guidance_table(info: dict) -> str:
    st, rows = info["settings"], info["samples"]
    times = [str(t) for t in next(iter(info["classifiers"].values()))["accuracy_on_x_t"] or {}]
    source = {c["source"] for c in info["classifiers"].values()}
    head = (f"Classifier guidance on the digits ({' / '.join(sorted(source))} classifiers, accuracy on x_t of "
            f"{st['eval_images']} test digits): DDIM {st['ddim_steps']} steps, scale {st['scale']:g}, "
            f"{10 * st['per_label']} samples (each digit {st['per_label']}x) from one x_T, judged by "
            f"{st['judge']} (digits-feature metrics, not FID)")
    lines = [head, f"{'guidance':<10} {'acc on x_t (t=' + ','.join(times) + ')':<28} {'on-target':>9} {'score':>6} "
                   f"{'Frechet':>8} {'prec':>5} {'recall':>6} {'density':>7} {'cover':>5}"]
    for name, r in rows.items():
        c = info["classifiers"].get(name)
        acc = " / ".join(f"{100 * a:.0f}" for a in c["accuracy_on_x_t"].values()) + " %" if c else "-"
        lines.append(f"{name:<10} {acc:<28} {100 * r['on_target']:8.0f}% {r['score']:6.2f} "
                     f"{r['frechet_distance']:8.1f} {r['precision']:5.2f} {r['recall']:6.2f} {r['density']:7.2f} "
                     f"{r['coverage']:5.2f}")
    return "\n".join(lines)


def _summary(result: dict) -> str:
    """Plain-language reading of the numbers: what DiffAug and the test-time modes did at this scale."""
    acc = result["accuracy"]
    lines = ["What this run measured (accuracy points, DiffAug classifier minus no-DiffAug classifier, and each "
             "mode minus Default for the same classifier):"]
    for d in acc.get("DiffAug", {}):
        a, b = acc["no DiffAug"][d], acc["DiffAug"][d]
        diffs = "  ".join(f"{m} {100 * (b[m] - a[m]):+.1f}" for m in a if a[m] is not None and b.get(m) is not None)
        tta = "  ".join(f"{m} {100 * (b[m] - b['Default']):+.1f}" for m in b
                        if m != "Default" and b[m] is not None and b.get("Default") is not None)
        lines.append(f"  {d}: DiffAug-vs-plain {diffs}   |  DiffAug clf, mode-vs-Default {tta}")
    cert, radii = result.get("certified_accuracy", {}), result.get("certify_radii", [])
    if cert and 0.5 in radii:
        k = radii.index(0.5)
        n = result["settings"]
        lines.append("  certified accuracy at L2 radius 0.5 (best sigma): " + ", ".join(
            f"{name} {100 * c['best'][k]:.0f}%" for name, c in cert.items() if c["best"][k] is not None)
            + f" ({n['cert_images']} digits, N = {n['cert_n']}: a sketch of the paper's table, not a measurement)")
    pg = result.get("pag")
    if pg:
        lines.append("  PAG, mean cosine with the Bayes direction through the denoiser: " + "; ".join(
            f"{name} " + ", ".join(f"t={t} {'n/a' if r['mean'] is None else format(r['mean'], '+.2f')}"
                                   for t, r in by["diffaug"].items()) for name, by in pg["alignment"].items()))
        lines.append("  accuracy under L2 PGD (eps in [-1, 1] units): " + "; ".join(
            f"{name} " + ", ".join(f"eps {e} {100 * a:.0f}%" for e, a in acc.items())
            for name, acc in pg["robust_accuracy"].items()))
    if result.get("quick"):
        lines.append("  (--quick: tiny training and image counts; the numbers are a smoke test, not a measurement)")
    if result.get("score_model") == "random":
        lines.append("  (--score-model random: an UNTRAINED score model; DiffAug/DE/DDA numbers mean nothing)")
    n = result["settings"]
    lines.append(f"  Default/DE use {n['eval_images']} test images per set, DDA/DDA-SE {n['dda_images']} (a 1-image "
                 f"difference is {100 / max(1, n['dda_images']):.1f} points there): differences of a few points "
                 f"are within noise.")
    return "\n".join(lines)


def main(args) -> int:
    corr = tuple(c.strip() for c in args.corruptions.split(",") if c.strip()) if args.corruptions else None
    try:
        run(out=args.out, quick=args.quick, seed=args.seed, score_model=args.score_model, threads=args.threads,
            epochs=args.epochs, model=args.model, eval_images=args.eval_images, dda_images=args.dda_images,
            corruptions=corr)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"diffaug demo: error: {e}") from None
    return 0

