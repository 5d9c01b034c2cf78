"""DiffAug-Ensemble: equal to a per-t loop of the reference with the same noise; t = 0 is the raw image."""

import pytest
import torch
from helpers import TinyEps
from torch import nn

import diffaug_kernels as dk
from diffaug_kernels import ensemble, reference

S = dk.NoiseSchedule.linear(1000)


@pytest.fixture
def parts():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    return clf, dk.DiffAug(TinyEps(), S)


def per_t_loop(clf, aug, x, times, seed):
    """The published evaluation's loop, one t at a time, on the reference ops with the expansion's noise."""
    B = x.shape[0]
    noisy = [t for t in times if t]
    x_t = reference.forward_noise_multi(x, noisy, S, seed)
    probs = []
    for t in times:
        if t == 0:
            probs.append(torch.softmax(clf(x), -1))
            continue
        k = noisy.index(t)
        xt = x_t[k * B:(k + 1) * B]
        tt = torch.full((B,), t)
        with torch.no_grad():
            x0 = reference.tweedie(xt, aug.model(xt, tt), tt, S, "eps", True)
        probs.append(torch.softmax(clf(x0), -1))
    return torch.stack(probs).mean(0)


@pytest.mark.parametrize("max_batch", [None, 1, 3, 4, 100])
def test_equals_per_t_loop(parts, max_batch):
    clf, aug = parts
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    times = list(range(0, 451, 50))
    got = dk.diffaug_ensemble(clf, aug, x, times, max_batch=max_batch, seed=11)
    want = per_t_loop(clf, aug, x, times, 11)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(4))


def test_t0_alone_is_the_classifier(parts):
    clf, aug = parts
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(dk.diffaug_ensemble(clf, aug, x, times=[0]), torch.softmax(clf(x), -1))


def test_runs_in_eval_mode_and_restores_the_modes(parts):
    """A classifier left in train mode: batch norm would normalise each UNet chunk by its own statistics (the
    result would depend on the chunk) and update its running stats. DE runs it in eval mode, then gives every
    submodule its own mode back."""
    _, aug = parts
    torch.manual_seed(1)
    clf = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.5), nn.Linear(144, 5))
    clf[1].running_mean.uniform_(-0.5, 0.5)
    clf.train()
    clf[3].eval()  # a submodule in its own mode
    stats = clf[1].running_mean.clone()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    got = [dk.diffaug_ensemble(clf, aug, x, max_batch=m, seed=11) for m in (3, 27)]
    assert clf.training and clf[1].training and not clf[3].training and aug.training
    assert torch.equal(clf[1].running_mean, stats), "running statistics must not move"
    want = per_t_loop(clf.eval(), aug, x, list(range(0, 451, 50)), 11)
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)


def _record_unet_calls(monkeypatch, aug):
    """Wraps aug.denoise (the one path to the UNet) to record each call's row count and t values."""
    calls = []
    denoise = aug.denoise

    def spy(xs, ts, **kw):
        calls.append((xs.shape[0], ts.tolist()))
        return denoise(xs, ts, **kw)

    monkeypatch.setattr(aug, "denoise", spy)
    return calls


@pytest.mark.parametrize("max_batch, sizes", [(100, [18]), (18, [18]), (4, [4, 4, 4, 4, 2]), (5, [5, 5, 5, 3]),
                                              (2, [2] * 9)])
def test_noisy_copies_run_in_as_few_unet_calls_as_max_batch_allows(parts, monkeypatch, max_batch, sizes):
    """B = 2 images, 9 noisy times: 18 rows, expanded once with forward_noise_multi, max_batch rows per call."""
    clf, aug = parts
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    times = list(range(0, 451, 50))
    expanded = []
    multi = ensemble.ops.forward_noise_multi
    monkeypatch.setattr(ensemble.ops, "forward_noise_multi",
                        lambda x0, ts, *a, **k: expanded.append(list(ts)) or multi(x0, ts, *a, **k))
    calls = _record_unet_calls(monkeypatch, aug)
    got = dk.diffaug_ensemble(clf, aug, x, times, max_batch=max_batch, seed=11)
    assert expanded == [times[1:]]  # all noisy times in one expansion
    assert [n for n, _ in calls] == sizes
    assert sum((ts for _, ts in calls), []) == [t for t in times[1:] for _ in range(2)]  # t-major rows
    torch.testing.assert_close(got, per_t_loop(clf, aug, x, times, 11), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fastest, sizes", [(8, [8, 8, 2]), (18, [18]), (2, [2] * 9)])
def test_without_max_batch_the_picked_chunk_is_used(parts, monkeypatch, fastest, sizes):
    """max_batch=None: pick_chunk times the candidates B, 2B, 4B, 8B, all rows (fake clock: `fastest` rows per
    call has the best rate), caches its pick, and the ensemble then calls the UNet with exactly that many rows."""
    clf, aug = parts
    monkeypatch.setattr(ensemble, "CHUNKS", {})
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    calls = _record_unet_calls(monkeypatch, aug)

    def clock(fn, device):
        fn()
        return 1.0 if calls[-1][0] == fastest else 100.0

    monkeypatch.setattr(ensemble, "_time_call", clock)
    got = dk.diffaug_ensemble(clf, aug, x, seed=3)
    ((_, chunk),) = ensemble.CHUNKS.values()
    assert chunk == fastest
    measured = len(calls) - len(sizes)
    assert sorted({n for n, _ in calls[:measured]}) == [2, 4, 8, 16, 18]  # every candidate was tried
    assert [n for n, _ in calls[measured:]] == sizes
    calls.clear()
    again = dk.diffaug_ensemble(clf, aug, x, seed=3)  # cached: no measuring, the same chunking
    assert [n for n, _ in calls] == sizes
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    torch.testing.assert_close(got, per_t_loop(clf, aug, x, list(ensemble.DEFAULT_TIMES), 3), rtol=1e-5, atol=1e-6)


def test_preprocess_applies_to_every_copy(parts):
    """preprocess(v) is what the classifier sees, for the raw image and every denoised copy."""
    clf, aug = parts
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    times = [0, 100, 200]
    f = lambda v: v.flip(-1) * 0.5  # noqa: E731 - not an identity, not a symmetry of the classifier
    seen = []
    got = dk.diffaug_ensemble(clf, aug, x, times, preprocess=lambda v: seen.append(v.shape[0]) or f(v), max_batch=2,
                              seed=1)
    assert sum(seen) == 2 * 3
    want = dk.diffaug_ensemble(lambda v: clf(f(v)), aug, x, times, max_batch=2, seed=1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for t in ([0], [100, 200]):  # both the raw image and the denoised copies go through f
        torch.testing.assert_close(dk.diffaug_ensemble(clf, aug, x, t, preprocess=f, seed=1),
                                   dk.diffaug_ensemble(lambda v: clf(f(v)), aug, x, t, seed=1), rtol=1e-6, atol=1e-7)
    plain = dk.diffaug_ensemble(clf, aug, x, times, max_batch=2, seed=1)
    assert (got - plain).abs().max() > 1e-3


def test_chunk_is_measured_once_and_is_a_candidate(parts, monkeypatch):
    clf, aug = parts
    monkeypatch.setattr(ensemble, "CHUNKS", {})
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    dk.diffaug_ensemble(clf, aug, x, seed=1)
    ((_, chunk),) = ensemble.CHUNKS.values()
    assert chunk in (2, 4, 8, 16, 18)  # B, 2B, 4B, 8B or all 9 * B rows
    calls = []
    monkeypatch.setattr(ensemble, "_time_call", lambda fn, d: calls.append(1) or 1.0)
    dk.diffaug_ensemble(clf, aug, x, seed=1)
    assert not calls  # cached
    # measured again for another autocast dtype, and for another model that happens to get a dead one's id
    dk.diffaug_ensemble(clf, dk.DiffAug(aug.model, S, dtype=torch.bfloat16), x, seed=1)
    assert calls and len(ensemble.CHUNKS) == 2
    calls.clear()
    key = next(iter(ensemble.CHUNKS))
    ensemble.CHUNKS[key] = (lambda: None, 2)  # as if the model measured under this id had been freed
    dk.diffaug_ensemble(clf, aug, x, seed=1)
    assert calls and ensemble.CHUNKS[key][0]() is aug.model


def test_bad_arguments(parts):
    clf, aug = parts
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="times must not be empty"):
        dk.diffaug_ensemble(clf, aug, x, times=[])
    with pytest.raises(ValueError, match="max_batch"):
        dk.diffaug_ensemble(clf, aug, x, max_batch=0)
    with pytest.raises(TypeError, match="aug must be a dk.DiffAug"):
        dk.diffaug_ensemble(clf, aug.model, x)
    with pytest.raises(ValueError, match=r"times must lie in \[0, 1000\)"):
        dk.diffaug_ensemble(clf, aug, x, times=[0, 1000])
    with pytest.raises(TypeError, match="times must hold integers"):
        dk.diffaug_ensemble(clf, aug, x, times=[50.7])  # not silently t = 50
    with pytest.raises(ValueError, match="max_batch"):
        dk.diffaug_ensemble(clf, aug, x, max_batch=1.5)
    for bad in [torch.empty(0, 3, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [x]]:
        with pytest.raises(ValueError, match="x must be a non-empty floating-point tensor"):
            dk.diffaug_ensemble(clf, aug, bad)
    with pytest.raises(ValueError, match=r"classifier must return logits \[N, num_classes\]"):
        dk.diffaug_ensemble(lambda v: clf(v).sum(-1), aug, x, times=[0, 50])
    # a single int is one time, as in forward_noise_multi
    for one in (50, torch.tensor(50), torch.tensor([50])):
        torch.testing.assert_close(dk.diffaug_ensemble(clf, aug, x, times=one, seed=3),
                                   dk.diffaug_ensemble(clf, aug, x, times=[50], seed=3))


@pytest.mark.parametrize("compiled", [False, True])
def test_chunk_search_stops_at_what_memory_holds(parts, monkeypatch, compiled):
    """Candidates that run out of memory are not taken; a compiled model takes the largest that fits, untimed."""
    clf, aug = parts
    monkeypatch.setattr(ensemble, "CHUNKS", {})
    monkeypatch.setattr(aug, "compiled", compiled)
    tried = []

    def denoise(xs, ts):
        tried.append(xs.shape[0])
        if xs.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.zeros(xs.shape[0], 6, *xs.shape[2:])

    monkeypatch.setattr(aug, "denoise", denoise)
    timed = []
    monkeypatch.setattr(ensemble, "_time_call", lambda fn, d: timed.append(fn()) or 1.0)
    x_t, t = torch.randn(18, 3, 8, 8), torch.zeros(18, dtype=torch.long)
    chunk = ensemble.pick_chunk(aug, x_t, t, 2)
    assert chunk == 4
    if compiled:
        assert tried == [18, 16, 8, 4] and not timed
    else:
        assert tried[0] == 2 and 8 in tried and 16 not in tried and timed

    def always_oom(xs, ts):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(ensemble, "CHUNKS", {})
    monkeypatch.setattr(aug, "denoise", always_oom)
    with pytest.raises(torch.OutOfMemoryError, match="pass a smaller batch"):
        ensemble.pick_chunk(aug, x_t, t, 2)
    monkeypatch.setattr(aug, "denoise", lambda xs, ts: (_ for _ in ()).throw(ValueError("not memory")))
    with pytest.raises(ValueError, match="not memory"):
        ensemble.pick_chunk(aug, x_t, t, 2)
