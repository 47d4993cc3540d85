"IGR (Thm 4.1): exactness on quadratics, degenerate cases, bad inputs, and the BatchNorm policy of igr_step."
import copy

import pytest, torch
import torch.nn as nn
import torch.nn.functional as F

from tgr.core import TGRError
from tgr.igr import (erm_gradient, erm_step, gradient_cosine, gradient_stats, gradient_variance, igr_gradient,
                     igr_step, module_loss_fns, regularized_gradient)

f64 = torch.float64


def _quadratics(m=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    fns = []
    for i in range(m):
        Q = torch.randn(n, n, generator=g, dtype=f64)
        A, c = Q @ Q.T / n + (i + 1) * 0.3 * torch.eye(n, dtype=f64), torch.randn(n, generator=g, dtype=f64)
        fns.append(lambda p, A=A, c=c: 0.5 * (torch.cat([p["a"].reshape(-1), p["b"]]) - c) @ A
                   @ (torch.cat([p["a"].reshape(-1), p["b"]]) - c))
    return fns, {"a": torch.randn(2, 2, generator=g, dtype=f64), "b": torch.randn(2, generator=g, dtype=f64)}


def _rhs(fns, params, beta):
    "grad Lbar + beta/(2m) grad sum ||g_i - gbar||^2 with torch.autograd (independent of tgr.igr)."
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    ks, m = list(p), len(fns)
    gs = [torch.autograd.grad(f(p), [p[k] for k in ks], create_graph=True) for f in fns]
    mean = [sum(g[j] for g in gs) / m for j in range(len(ks))]
    s = sum(((g[j] - mean[j]) ** 2).sum() for g in gs for j in range(len(ks)))
    ds = torch.autograd.grad(s, [p[k] for k in ks])
    return {k: (mean[j] + beta / (2 * m) * ds[j]).detach() for j, k in enumerate(ks)}


@pytest.mark.parametrize("beta", [0.01, 0.7])
def test_quadratic_exact(beta):
    fns, params = _quadratics()
    rhs = _rhs(fns, params, beta)
    for got in (igr_gradient(fns, params, beta), regularized_gradient(fns, params, beta)):
        assert max((got[k] - rhs[k]).abs().max().item() for k in rhs) < 1e-12


def test_degenerate_cases_and_stats():
    fns, params = _quadratics()
    g0, erm = igr_gradient(fns, params, 0.0), erm_gradient(fns, params)
    assert all(torch.equal(g0[k], erm[k]) for k in erm)
    g1, plain = igr_gradient(fns[:1], params, 0.5), erm_gradient(fns[:1], params)
    assert all(torch.equal(g1[k], plain[k]) for k in plain)
    assert gradient_variance(fns[:1], params).item() == 0 and gradient_cosine(fns[:1], params).isnan()
    st = gradient_stats(fns, params)
    assert st.m == 3 and torch.allclose(st.cosine.diagonal(), torch.ones(3, dtype=f64))
    assert -1 <= st.mean_cosine.item() <= 1 and st.variance.item() > 0


def test_bad_inputs():
    fns, params = _quadratics()
    cases = [(lambda: igr_gradient([], params, 0.1), "loss_fns is empty"),
             (lambda: igr_gradient(fns[0], params, 0.1), "wrap a single loss"),
             (lambda: igr_gradient(fns, params, -1.0), "beta must be"),
             (lambda: igr_gradient(fns, params, float("inf")), "beta must be"),
             (lambda: igr_gradient(fns, [params["a"]], 0.1), "params must be a dict"),
             (lambda: igr_gradient(fns, {}, 0.1), "params is empty"),
             (lambda: gradient_variance(fns, {"a": torch.zeros(2, 2, dtype=torch.int64), "b": params["b"]}), "floating"),
             (lambda: gradient_variance([lambda p: p["b"] * 2], params), "scalar")]
    for fn, msg in cases:
        with pytest.raises(TGRError, match=msg): fn()


def test_batchnorm_policy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    tasks = [(torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))) for _ in range(3)]
    ref = copy.deepcopy(net)
    for x, _ in tasks: ref(x)                                  # what an ERM step does to the running statistics
    before = {k: b.clone() for k, b in net.named_buffers()}
    fns, params = module_loss_fns(net, tasks, F.cross_entropy)
    g = igr_gradient(fns, params, 0.05)
    assert all(torch.equal(before[k], b) for k, b in net.named_buffers())   # pure: untouched
    model = copy.deepcopy(net)
    igr_step(model, tasks, F.cross_entropy, 0.05)
    for (k, b), (_, r) in zip(model.named_buffers(), ref.named_buffers()): assert torch.equal(b, r), k
    for k, p in model.named_parameters(): assert torch.allclose(p.grad, g[k], atol=1e-6), k
    erm_model = copy.deepcopy(net)
    erm_step(erm_model, tasks, F.cross_entropy)
    for (k, b), (_, r) in zip(erm_model.named_buffers(), ref.named_buffers()): assert torch.equal(b, r), k
    with pytest.raises(TGRError, match="wrap a single task"): igr_step(net, tasks[0], F.cross_entropy, 0.1)
