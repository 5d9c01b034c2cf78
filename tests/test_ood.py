"""dk.ood: each score against its definition computed independently here (float64 loops over samples),
its invariances, the metrics on hand-computed cases, and the error paths."""
import math

import numpy as np
import pytest
import torch

from diffaug_kernels import ood

E = math.e


# ----------------------------------------------------------------------------------------------------------
# independent float64 definitions (plain Python / numpy loops, no torch)


def lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(a - m) for a in v))


def head(x, w, b):
    """Logits of one sample: x [D], w [K, D], b [K] (float64 numpy)."""
    return [sum(w[k, j] * x[j] for j in range(len(x))) + (b[k] if b is not None else 0.0) for k in range(w.shape[0])]


def k_kept(n, p):
    # round half to even, written out: n*p/100 = q + f
    v = n * p / 100.0
    q = math.floor(v)
    f = v - q
    r = q + 1 if f > 0.5 or (f == 0.5 and q % 2 == 1) else q
    return n - r


def shaped_loop(x, p, prune):
    """ASH-S (prune=True) / SCALE (prune=False) on one flat sample, by sorting."""
    n = len(x)
    k = k_kept(n, p)
    order = sorted(range(n), key=lambda j: -x[j])
    keep = set(order[:k])
    s1 = sum(x)
    s2 = sum(x[j] for j in keep)
    r = math.exp(s1 / s2)
    return np.array([(x[j] * r if (j in keep or not prune) else 0.0) for j in range(n)])


def ref_ash_scale(feats, w, b, p, prune):
    feats = np.asarray(feats, dtype=np.float64)
    out = []
    for i in range(feats.shape[0]):
        f = feats[i]
        s = shaped_loop(list(f.ravel()), p, prune).reshape(f.shape)
        if f.ndim == 3:  # [C, H, W] -> average pool
            s = s.mean(axis=(1, 2))
        out.append(lse(head(s, w, b)))
    return np.array(out)


def ref_react(feats, w, b, c):
    feats = np.asarray(feats, dtype=np.float64)
    out = []
    for i in range(feats.shape[0]):
        f = feats[i]
        s = np.array([min(v, c) for v in f.ravel()]).reshape(f.shape)
        if f.ndim == 3:
            s = s.mean(axis=(1, 2))
        out.append(lse(head(s, w, b)))
    return np.array(out)


def relu_feats(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).relu()  # post-ReLU: many exact zeros
    return x + 0.01 * torch.rand(*shape, generator=g, dtype=torch.float64)  # but no ties


def linear_head(k, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(d),
            torch.randn(k, generator=g, dtype=torch.float64))


def close(a, b, rtol=1e-10, atol=1e-10):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    np.testing.assert_allclose(a, np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------
# msp / energy


def test_msp_matches_definition_and_range():
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(16, 7, generator=g, dtype=torch.float64)
    ref = [max(math.exp(v - lse(row)) for v in row) for row in z.tolist()]
    s = ood.msp(z)
    assert s.shape == (16,) and s.dtype == torch.float64
    close(s, ref)
    assert ((s > 0) & (s <= 1)).all() and (s >= 1 / 7 - 1e-12).all()
    close(ood.msp(z + 5.0), ref)                                     # shift invariant
    close(ood.msp(torch.tensor([[1000.0, 0.0, 0.0]])), [1.0])        # saturates at 1, no overflow
    close(ood.msp(torch.zeros(2, 4)), [0.25, 0.25])                  # uniform -> 1/K


def test_energy_matches_definition_and_temperature():
    g = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(16, 10, generator=g, dtype=torch.float64)
    for t in (1.0, 0.5, 3.0, 1000.0):
        ref = [t * lse([v / t for v in row]) for row in z.tolist()]
        close(ood.energy(z, temperature=t), ref)
    close(ood.energy(z), torch.logsumexp(z, 1))
    close(ood.energy(z + 2.5), ood.energy(z) + 2.5)                         # shift equivariant
    close(ood.energy(3 * z, temperature=3.0), 3 * ood.energy(z))           # T * E(z / T) scaling
    close(ood.energy(z, temperature=1e-4), z.max(1).values, atol=1e-3)     # T -> 0: max logit
    assert (ood.energy(z) >= z.max(1).values).all()
    close(ood.energy(torch.zeros(3, 5, dtype=torch.float64)), [math.log(5)] * 3)


def test_dtypes_and_numpy_inputs():
    z = np.random.default_rng(2).standard_normal((5, 4))
    for f in (ood.msp, ood.energy):
        a, b = f(z), f(torch.from_numpy(z))
        assert isinstance(a, torch.Tensor) and a.dtype == torch.float64
        close(a, b, rtol=0, atol=0)
        assert f(z.astype(np.float32)).dtype == torch.float32
        h = f(torch.from_numpy(z).half())
        assert h.dtype == torch.float32                                    # low precision computed in float32
        close(h.double(), f(torch.from_numpy(z).half().double()), rtol=1e-6, atol=1e-6)
        assert f([[1, 2], [3, 0]]).dtype == torch.float32                  # integer lists


# ----------------------------------------------------------------------------------------------------------
# ReAct


def test_react_threshold_is_flattened_percentile():
    x = torch.arange(1.0, 11.0).reshape(2, 5)
    assert ood.react_threshold(x, 90) == pytest.approx(9.1)                # linear: 9 + 0.1 * (10 - 9)
    assert ood.react_threshold(x, 0) == 1.0 and ood.react_threshold(x, 100) == 10.0
    f = relu_feats((40, 32), 3)
    assert ood.react_threshold(f) == pytest.approx(float(np.percentile(f.numpy().ravel(), 90)), rel=1e-12)
    f4 = relu_feats((6, 8, 3, 3), 4)                                       # 4-D: every activation counts
    assert ood.react_threshold(f4, 75) == pytest.approx(float(np.percentile(f4.numpy().ravel(), 75)), rel=1e-12)
    assert ood.react_threshold(f.numpy(), 90) == ood.react_threshold(f, 90)
    assert isinstance(ood.react_threshold(f), float)


@pytest.mark.parametrize("shape", [(12, 24), (5, 6, 3, 2)])
def test_react_matches_explicit_clipping(shape):
    f = relu_feats(shape, 5)
    w, b = linear_head(7, shape[1], 6)
    c = ood.react_threshold(f, 80)
    s = ood.react(f, w, b, c)
    assert s.shape == (shape[0],) and s.dtype == torch.float64
    close(s, ref_react(f.numpy(), w.numpy(), b.numpy(), c))
    close(ood.react(f, w, None, c), ref_react(f.numpy(), w.numpy(), None, c))
    # a threshold above every activation is plain energy of the (pooled) logits
    pooled = f if f.dim() == 2 else f.mean((2, 3))
    close(ood.react(f, w, b, float(f.max()) + 1), ood.energy(pooled @ w.T + b))
    close(ood.react(f, w, b, torch.tensor(c, dtype=torch.float64)), s)     # tensor threshold


# ----------------------------------------------------------------------------------------------------------
# ASH-S and SCALE


@pytest.mark.parametrize("p", [0, 10, 65, 85, 90, 99])
def test_ash_matches_sorted_loop(p):
    f = relu_feats((10, 64), 7)
    w, b = linear_head(5, 64, 8)
    close(ood.ash(f, w, b, p), ref_ash_scale(f.numpy(), w.numpy(), b.numpy(), p, prune=True))


@pytest.mark.parametrize("p", [0, 10, 65, 85, 90, 99])
def test_scale_matches_sorted_loop(p):
    f = relu_feats((10, 64), 9)
    w, b = linear_head(5, 64, 10)
    close(ood.scale(f, w, b, p), ref_ash_scale(f.numpy(), w.numpy(), b.numpy(), p, prune=False))


def test_ash_scale_4d_shape_over_chw_then_pool():
    f = relu_feats((4, 6, 3, 2), 11)                                       # n = 36 per sample
    w, b = linear_head(3, 6, 12)
    for p in (50, 90):
        close(ood.ash(f, w, b, p), ref_ash_scale(f.numpy(), w.numpy(), b.numpy(), p, prune=True))
        close(ood.scale(f, w, b, p), ref_ash_scale(f.numpy(), w.numpy(), b.numpy(), p, prune=False))
    g = relu_feats((4, 6), 13)                                             # [N, C, 1, 1] == [N, C]
    for fn in (ood.ash, ood.scale):
        close(fn(g[:, :, None, None], w, b, 70), fn(g, w, b, 70), rtol=1e-14, atol=1e-14)
    close(ood.react(g[:, :, None, None], w, b, 0.5), ood.react(g, w, b, 0.5), rtol=1e-14, atol=1e-14)


def test_single_class_head_exposes_the_factor():
    """With one class, weight = ones, bias = 0, the score IS the sum of the shaped activations:
    ASH-S -> exp(s1/s2) * s2, SCALE -> exp(s1/s2) * s1."""
    f = relu_feats((8, 50), 14)
    ones = torch.ones(1, 50, dtype=torch.float64)
    p = 80
    k = 50 - round(50 * 0.8)  # 10
    top = f.sort(dim=1, descending=True).values[:, :k]
    s1, s2 = f.sum(1), top.sum(1)
    close(ood.ash(f, ones, None, p), torch.exp(s1 / s2) * s2)
    close(ood.scale(f, ones, None, p), torch.exp(s1 / s2) * s1)
    assert (s1 / s2 >= 1).all()                                            # non-negative features: factor >= e


def test_percentile_zero_keeps_everything_with_factor_e():
    f = relu_feats((9, 20), 15)
    w, b = linear_head(4, 20, 16)
    expect = ood.energy(E * (f @ w.T) + b)                                 # nothing pruned, s1 = s2, factor e
    close(ood.ash(f, w, b, 0), expect)
    close(ood.scale(f, w, b, 0), expect)
    # without bias: logsumexp(e z) = e * energy(z, T = 1/e)
    close(ood.scale(f, w, None, 0), E * ood.energy(f @ w.T, temperature=1 / E))


def test_scale_is_invariant_to_feature_scale_in_its_factor():
    f = relu_feats((6, 30), 17)
    w, b = linear_head(4, 30, 18)
    c = 3.7
    # s1 / s2 is unchanged by x -> c x, so SCALE(c x) = energy(exp(s1/s2) * c * x W^T + b)
    k = 30 - round(30 * 0.85)
    r = torch.exp(f.sum(1) / f.sort(1, descending=True).values[:, :k].sum(1))
    close(ood.scale(c * f, w, b, 85), ood.energy(r[:, None] * c * (f @ w.T) + b))


def test_rounding_is_half_to_even_like_the_reference():
    # n = 10, p = 65: n * p / 100 = 6.5 -> np.round gives 6 (half to even) -> k = 4 kept, not 3
    assert k_kept(10, 65) == 4 and int(np.round(6.5)) == 6
    f = relu_feats((3, 10), 19)
    ones = torch.ones(1, 10, dtype=torch.float64)
    top = f.sort(dim=1, descending=True).values
    s1 = f.sum(1)
    for kk in (3, 4, 5):
        s2 = top[:, :kk].sum(1)
        matches = torch.allclose(ood.ash(f, ones, None, 65), torch.exp(s1 / s2) * s2, rtol=1e-12, atol=0)
        assert matches == (kk == 4)
    # p = 25 -> 2.5 -> 2 -> k = 8; p = 35 -> 3.5 -> 4 -> k = 6
    assert k_kept(10, 25) == 8 and k_kept(10, 35) == 6


def test_ash_scale_dtypes_numpy_and_input_not_modified():
    f = relu_feats((5, 16), 20)
    w, b = linear_head(3, 16, 21)
    f0 = f.clone()
    for fn in (ood.ash, ood.scale):
        a = fn(f, w, b, 75)
        assert torch.equal(f, f0)                                          # the reference code works in place; we don't
        close(fn(f.numpy(), w.numpy(), b.numpy(), 75), a, rtol=0, atol=0)
        s32 = fn(f.float(), w.float(), b.float(), 75)
        assert s32.dtype == torch.float32
        close(s32.double(), a, rtol=1e-5, atol=1e-5)
        assert fn(f.float(), w, b, 75).dtype == torch.float32              # head follows the features' dtype


def test_scores_rank_shaped_ood_lower():
    """A sanity run of the pipeline: ID features concentrated on the classes' directions score higher than
    diffuse OOD features. (Not ASH/SCALE: their factor exp(s1/s2) grows for flat activation profiles, so this
    toy OOD set is not a fair check of them; their definitions are tested above.)"""
    g = torch.Generator().manual_seed(22)
    d, k = 32, 4
    w = torch.zeros(k, d)
    for c in range(k):
        w[c, c * 8:(c + 1) * 8] = 1.0
    b = torch.zeros(k)
    id_f = torch.rand(200, d, generator=g) * 0.2
    id_f[torch.arange(200)[:, None], (torch.arange(200) % k)[:, None] * 8 + torch.arange(8)] += 2.0
    ood_f = torch.rand(200, d, generator=g) * 0.6
    c = ood.react_threshold(id_f)
    for s_id, s_ood in [(ood.msp(id_f @ w.T), ood.msp(ood_f @ w.T)),
                        (ood.energy(id_f @ w.T), ood.energy(ood_f @ w.T)),
                        (ood.react(id_f, w, b, c), ood.react(ood_f, w, b, c))]:
        assert ood.auroc(s_id, s_ood) > 0.95


# ----------------------------------------------------------------------------------------------------------
# metrics


def test_auroc_hand_computed():
    # pairs (id, ood) correctly ordered: 0.9 > both, 0.8 > both, 0.4 > 0.3 only -> 5 of 6
    assert ood.auroc([0.9, 0.8, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6)
    assert ood.auroc(torch.tensor([0.9, 0.8, 0.4]), np.array([0.5, 0.3])) == pytest.approx(5 / 6)
    assert ood.auroc([1.0, 2.0], [1.0, 0.0]) == pytest.approx(0.875)      # a tie counts one half: (.5 + 1 + 1 + 1) / 4
    assert isinstance(ood.auroc([1.0], [0.0]), float)


def test_auroc_separation_and_identical():
    rng = np.random.default_rng(23)
    a = rng.standard_normal(500)
    assert ood.auroc(a + 100, a) == 1.0
    assert ood.auroc(a, a + 100) == 0.0
    assert ood.auroc(a, a) == 0.5                                          # every pair a tie
    assert abs(ood.auroc(rng.standard_normal(4000), rng.standard_normal(4000)) - 0.5) < 0.03


def test_fpr_hand_computed():
    # keep >= 95% of 3 ID samples -> all 3 -> threshold 0.4 -> OOD accepted: 0.5 only -> 1/2
    assert ood.fpr_at_95_tpr([0.9, 0.8, 0.4], [0.5, 0.3]) == 0.5
    # ID = 1..20: threshold 2 keeps 19/20 = 95%; OOD >= 2: 5.5, 10.5, 25 -> 3/4
    assert ood.fpr_at_95_tpr(np.arange(1.0, 21.0), [0.5, 5.5, 10.5, 25.0]) == 0.75
    # an OOD score equal to the threshold is accepted (>=)
    assert ood.fpr_at_95_tpr(np.arange(1.0, 21.0), [2.0, 1.5]) == 0.5
    # tpr level: 50% of ID = 1..20 -> threshold 11 -> OOD >= 11: 25 -> 1/4
    assert ood.fpr_at_95_tpr(np.arange(1.0, 21.0), [0.5, 5.5, 10.5, 25.0], tpr=0.5) == 0.25
    assert ood.fpr_at_95_tpr(np.arange(1.0, 21.0) + 100, np.arange(1.0, 21.0)) == 0.0
    assert ood.fpr_at_95_tpr(np.arange(1.0, 21.0), np.arange(1.0, 21.0) + 100) == 1.0
    assert isinstance(ood.fpr_at_95_tpr([1.0], [0.0]), float)


@pytest.mark.parametrize("n_id,n_ood,seed", [(20, 7, 0), (100, 100, 1), (333, 50, 2), (1000, 999, 3)])
def test_fpr_matches_order_statistic_with_ties(n_id, n_ood, seed):
    rng = np.random.default_rng(seed)
    i = np.round(rng.standard_normal(n_id) + 1, 1)                        # rounded: many ties, also across sets
    o = np.round(rng.standard_normal(n_ood), 1)
    m = (95 * n_id + 99) // 100                                            # ceil(0.95 n) in integers
    thr = np.sort(i)[::-1][m - 1]
    assert ood.fpr_at_95_tpr(i, o) == pytest.approx(np.mean(o >= thr), abs=1e-15)


# ----------------------------------------------------------------------------------------------------------
# errors


def test_errors_logits():
    with pytest.raises(ValueError, match="logits must be \\[N, K\\]"):
        ood.msp(torch.randn(5))
    with pytest.raises(ValueError, match="non-empty"):
        ood.energy(torch.randn(0, 3))
    with pytest.raises(ValueError, match="non-empty"):
        ood.msp(torch.randn(3, 0))
    with pytest.raises(ValueError, match="temperature"):
        ood.energy(torch.randn(2, 3), temperature=0)
    with pytest.raises(ValueError, match="temperature"):
        ood.energy(torch.randn(2, 3), temperature=-1.0)
    with pytest.raises(TypeError, match="logits"):
        ood.msp(torch.zeros(2, 2, dtype=torch.bool))


def test_errors_features_and_head():
    f, (w, b) = relu_feats((4, 8), 0), linear_head(3, 8, 0)
    for fn, extra in [(ood.ash, (90,)), (ood.scale, (85,)), (ood.react, (1.0,))]:
        with pytest.raises(ValueError, match="weight must be \\[K, 8\\]"):
            fn(f, w[:, :7], b, *extra)
        with pytest.raises(ValueError, match="weight must be \\[K, 2\\]"):   # 4-D: weight must match C
            fn(f.reshape(4, 2, 2, 2), w, b, *extra)
        with pytest.raises(ValueError, match="bias must be \\[K\\]"):
            fn(f, w, b[:2], *extra)
        with pytest.raises(ValueError, match="weight must be \\[K, D\\]"):
            fn(f, w[0], b, *extra)
        with pytest.raises(ValueError, match="features must be \\[N, D\\] or \\[N, C, H, W\\]"):
            fn(f[0], w, b, *extra)
        with pytest.raises(ValueError, match="features must be \\[N, D\\] or \\[N, C, H, W\\]"):
            fn(f.reshape(4, 2, 4), w, b, *extra)
        with pytest.raises(ValueError, match="non-empty"):
            fn(f[:0], w, b, *extra)
        with pytest.raises(ValueError, match="features are on cpu"):
            fn(f, w.to("meta"), b, *extra)


@pytest.mark.parametrize("p", [-1, 100, 100.0, 150, float("nan")])
def test_errors_percentile(p):
    f, (w, b) = relu_feats((4, 8), 0), linear_head(3, 8, 0)
    with pytest.raises(ValueError, match="percentile must be in \\[0, 100\\)"):
        ood.ash(f, w, b, p)
    with pytest.raises(ValueError, match="percentile must be in \\[0, 100\\)"):
        ood.scale(f, w, b, p)


def test_errors_percentile_keeps_nothing_and_threshold():
    f, (w, b) = relu_feats((4, 3), 0), linear_head(2, 3, 0)
    with pytest.raises(ValueError, match="keeps no activation"):
        ood.ash(f, w, b, 90)                                               # round(2.7) = 3 of 3 pruned
    ood.ash(f, w, b, 80)                                                   # round(2.4) = 2: keeps 1, fine
    with pytest.raises(ValueError, match="percentile must be in \\[0, 100\\]"):
        ood.react_threshold(f, 101)
    with pytest.raises(ValueError, match="non-empty"):
        ood.react_threshold(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        ood.react_threshold(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="threshold is NaN"):
        ood.react(f, w, b, float("nan"))


def test_errors_metrics():
    for fn in (ood.auroc, ood.fpr_at_95_tpr):
        with pytest.raises(ValueError, match="id_scores is empty"):
            fn([], [0.1])
        with pytest.raises(ValueError, match="ood_scores is empty"):
            fn([0.1], np.array([]))
        with pytest.raises(ValueError, match="1-D"):
            fn(np.ones((2, 2)), [0.1])
        with pytest.raises(ValueError, match="ood_scores contains 1 NaN"):
            fn([0.1, 0.2], [float("nan"), 0.3])
    with pytest.raises(ValueError, match="tpr must be in"):
        ood.fpr_at_95_tpr([0.1], [0.2], tpr=0.0)
