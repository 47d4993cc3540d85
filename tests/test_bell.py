"BELL (FREE, Algorithm 2): the second-order expansion, degenerate cases, optimizer equivalence, bad inputs, BatchNorm policy."
import copy, itertools

import pytest, torch
import torch.nn as nn
import torch.nn.functional as F

from tgr.core import TGRError
from tgr.bell import bell_gradient, bell_step, bell_update, gradient_inner_product, mean_inner_product
from tgr.igr import erm_gradient, erm_step, gradient_stats, igr_step, module_loss_fns

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")      # fixture in conftest.py


def _quadratics(m=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = lambda p: torch.cat([p["a"].reshape(-1), p["b"]])
    fns = []
    for i in range(m):
        Q = torch.randn(n, n, generator=g, dtype=f64)
        A, c = Q @ Q.T / n + (i + 1) * 0.3 * torch.eye(n, dtype=f64), torch.randn(n, generator=g, dtype=f64)
        fns.append(lambda p, A=A, c=c: 0.5 * (flat(p) - c) @ A @ (flat(p) - c))
    return fns, {"a": torch.randn(2, 2, generator=g, dtype=f64), "b": torch.randn(2, generator=g, dtype=f64)}


def _tanh_tasks(m=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    mlp = lambda p, X: torch.tanh(X @ p["W"]) @ p["v"]
    fns = []
    for i in range(m):
        X, a = torch.randn(20, 3, generator=g, dtype=f64), torch.randn(3, generator=g, dtype=f64)
        fns.append(lambda p, X=X, y=torch.sin(X @ a): ((mlp(p, X) - y) ** 2).mean())
    return fns, {"W": torch.randn(3, 6, generator=g, dtype=f64) / 3, "v": torch.randn(6, generator=g, dtype=f64) / 6}


def _terms(fns, params, order):
    "(sum_p g_{t_p}, sum_{q<p} H_{t_p} g_{t_q}) with torch.autograd, one step per task (independent of tgr.bell)."
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    ks = list(p)
    gs = [torch.autograd.grad(f(p), [p[k] for k in ks], create_graph=True) for f in fns]
    first = {k: sum(gs[i][j] for i in order).detach() for j, k in enumerate(ks)}
    second = {k: torch.zeros_like(p[k]) for k in ks}
    for a, b in itertools.combinations(range(len(order)), 2):   # a visited before b: H_b g_a
        hv = torch.autograd.grad(gs[order[b]], [p[k] for k in ks], grad_outputs=[t.detach() for t in gs[order[a]]],
                                 retain_graph=True)
        for j, k in enumerate(ks): second[k] += hv[j]
    return first, second


def _disp(fns, params, alpha, order):
    new = bell_update(fns, params, alpha, 1.0, order=order)
    return {k: new[k] - params[k] for k in params}


def _norm(d): return torch.sqrt(sum((v ** 2).sum() for v in d.values())).item()


@pytest.mark.parametrize("alpha", [1e-2, 0.7])
@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_two_quadratics_second_order_is_exact(alpha, order):
    fns, params = _quadratics(m=2)
    first, second = _terms(fns, params, order)
    pred = {k: -alpha * first[k] + alpha ** 2 * second[k] for k in first}
    assert _norm({k: _disp(fns, params, alpha, order)[k] - pred[k] for k in pred}) < 1e-12 * _norm(pred)


@pytest.mark.parametrize("problem", [_quadratics, _tanh_tasks])
def test_residual_is_third_order(problem):
    fns, params = problem()
    order = [2, 0, 1]
    first, second = _terms(fns, params, order)
    res = []
    for a in (1e-3, 1e-2):
        d = _disp(fns, params, a, order)
        res.append(_norm({k: d[k] + a * first[k] - a ** 2 * second[k] for k in d}))
    assert 800 < res[1] / res[0] < 1250          # x10 in alpha -> x1000 in the residual


def test_order_average_raises_inner_product():
    "Averaged over all orders the second-order term is (alpha^2 / 2) grad sum_{j<k} <g_j, g_k> (Theorem 1 of FREE)."
    fns, params = _tanh_tasks()
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    gs = [torch.autograd.grad(f(p), list(p.values()), create_graph=True) for f in fns]
    P = sum(sum((x * y).sum() for x, y in zip(gs[j], gs[k])) for j, k in itertools.combinations(range(3), 2))
    dP = dict(zip(p, torch.autograd.grad(P, list(p.values()))))
    erm = erm_gradient(fns, params)
    res = []
    for a in (1e-3, 1e-2):
        ds = [_disp(fns, params, a, list(o)) for o in itertools.permutations(range(3))]
        avg = {k: sum(d[k] for d in ds) / len(ds) for k in params}
        res.append(_norm({k: avg[k] + 3 * a * erm[k] - a ** 2 / 2 * dP[k] for k in params}))
    assert 800 < res[1] / res[0] < 1250


def test_degenerate_cases_and_forms():
    fns, params = _quadratics()
    g0, erm = bell_gradient(fns, params, 0.0, order=[2, 1, 0]), erm_gradient(fns, params)
    assert all(torch.equal(g0[k], erm[k]) for k in erm)                                   # alpha = 0: ERM
    g1, plain = bell_gradient(fns[:1], params, 0.4), erm_gradient(fns[:1], params)
    assert all(torch.equal(g1[k], plain[k]) for k in plain)                               # one task, one step
    same = bell_update(fns, params, 0.1, 0.0)
    assert all(torch.equal(same[k], params[k]) for k in params)                           # epsilon = 0
    for steps in (1, 3):                                                                  # update = theta - eps*a*m*s*g
        g = bell_gradient(fns, params, 0.05, inner_steps=steps, order=[1, 2, 0])
        new = bell_update(fns, params, 0.05, 0.4, inner_steps=steps, order=[1, 2, 0])
        for k in params: assert torch.allclose(new[k], params[k] - 0.4 * 0.05 * 3 * steps * g[k], atol=1e-12)
    theta = dict(params)                                                                  # epsilon = 1: by hand
    for i in [1, 2, 0]:
        for _ in range(2): theta = {k: theta[k] - 0.05 * v for k, v in torch.func.grad(fns[i])(theta).items()}
    tilde = bell_update(fns, params, 0.05, 1.0, inner_steps=2, order=[1, 2, 0])
    assert all(torch.allclose(tilde[k], theta[k], atol=1e-14) for k in params)


def test_inner_product_helpers():
    fns, params = _tanh_tasks()
    gs = [torch.func.grad(f)(params) for f in fns]
    want = sum(sum((gs[j][k] * gs[i][k]).sum() for k in params) for i, j in itertools.combinations(range(3), 2)) / 3
    assert torch.allclose(gradient_inner_product(fns, params), want, atol=1e-12)
    assert torch.allclose(mean_inner_product(gradient_stats(fns, params)), want, atol=1e-12)
    assert gradient_inner_product(fns[:1], params).isnan() and mean_inner_product(gradient_stats(fns[:1], params)).isnan()


def test_bad_inputs():
    fns, params = _quadratics()
    cases = [(lambda: bell_update([], params, 0.1, 0.5), "loss_fns is empty"),
             (lambda: bell_update(fns[0], params, 0.1, 0.5), "wrap a single loss"),
             (lambda: bell_gradient(fns, {}, 0.1), "params is empty"),
             (lambda: bell_gradient(fns, params, -0.1), "inner_lr must be a finite number >= 0"),
             (lambda: bell_gradient(fns, params, float("nan")), "inner_lr"),
             (lambda: bell_update(fns, params, 0.1, float("inf")), "epsilon must be"),
             (lambda: bell_update(fns, params, 0.1, "0.5"), "epsilon must be"),
             (lambda: bell_gradient(fns, params, 0.1, inner_steps=0), "inner_steps must be an integer >= 1"),
             (lambda: bell_gradient(fns, params, 0.1, inner_steps=True), "inner_steps"),
             (lambda: bell_gradient(fns, params, 0.1, order=[0, 1]), "permutation of the task indices 0..2"),
             (lambda: bell_gradient(fns, params, 0.1, order=[0, 1, 1]), "order must be"),
             (lambda: bell_gradient(fns, params, 0.1, order=[0, 1, 3]), "order must be"),
             (lambda: bell_gradient(fns, params, 0.1, order="012"), "order must be"),
             (lambda: mean_inner_product(None), "takes the GradStats")]
    for fn, msg in cases:
        with pytest.raises(TGRError, match=msg): fn()


def _net_and_tasks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    tasks = [(torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))) for _ in range(3)]
    return net, tasks


def test_batchnorm_policy_and_stats():
    net, tasks = _net_and_tasks()
    ref = copy.deepcopy(net)
    for x, _ in tasks: ref(x)                                     # what an ERM step does to the running statistics
    before = {k: b.clone() for k, b in net.named_buffers()}
    fns, params = module_loss_fns(net, tasks, F.cross_entropy)
    g = bell_gradient(fns, params, 0.05, order=[1, 2, 0])
    assert all(torch.equal(before[k], b) for k, b in net.named_buffers())       # pure losses: untouched
    model = copy.deepcopy(net)
    st = bell_step(model, tasks, F.cross_entropy, 0.05, order=[1, 2, 0])
    for (k, b), (_, r) in zip(model.named_buffers(), ref.named_buffers()): assert torch.equal(b, r), k
    for k, p in model.named_parameters(): assert torch.allclose(p.grad, g[k], atol=1e-6), k
    st_erm = erm_step(copy.deepcopy(net), tasks, F.cross_entropy)
    assert torch.allclose(st.variance, st_erm.variance, atol=1e-6) and torch.allclose(st.losses, st_erm.losses, atol=1e-6)
    frozen_bn = copy.deepcopy(net)
    bell_step(frozen_bn, tasks, F.cross_entropy, 0.05, update_bn=False)
    assert all(torch.equal(before[k], b) for k, b in frozen_bn.named_buffers())
    ev = copy.deepcopy(net).eval()
    bell_step(ev, tasks, F.cross_entropy, 0.05)
    assert all(torch.equal(before[k], b) for k, b in ev.named_buffers())


def test_literal_and_optimizer_forms_agree():
    net, tasks = _net_and_tasks()
    fns, params = module_loss_fns(net, tasks, F.cross_entropy)
    want = bell_update(fns, params, 0.05, 0.3, inner_steps=2, order=[2, 0, 1])
    lit = copy.deepcopy(net)
    bell_step(lit, tasks, F.cross_entropy, 0.05, epsilon=0.3, inner_steps=2, order=[2, 0, 1])
    assert all(p.grad is None for p in lit.parameters())
    sgd_net = copy.deepcopy(net)
    opt = torch.optim.SGD(sgd_net.parameters(), lr=0.3 * 0.05 * 3 * 2)
    opt.zero_grad(); bell_step(sgd_net, tasks, F.cross_entropy, 0.05, inner_steps=2, order=[2, 0, 1]); opt.step()
    for mod in (lit, sgd_net):
        for k, p in mod.named_parameters(): assert torch.allclose(p.detach(), want[k], atol=1e-6), k


def test_bell_step_bad_inputs_leave_model_untouched():
    net, tasks = _net_and_tasks()
    before = {k: b.clone() for k, b in net.named_buffers()}
    for kwargs, msg in [(dict(order=[0, 1]), "order must be"), (dict(epsilon=-1.0), "epsilon"),
                        (dict(inner_steps=0), "inner_steps")]:
        with pytest.raises(TGRError, match=msg): bell_step(net, tasks, F.cross_entropy, 0.05, **kwargs)
    with pytest.raises(TGRError, match="wrap a single task"): bell_step(net, tasks[0], F.cross_entropy, 0.05)
    with pytest.raises(TGRError, match="inner_lr"): bell_step(net, tasks, F.cross_entropy, None)
    assert all(torch.equal(before[k], b) for k, b in net.named_buffers())
    assert all(p.grad is None for p in net.parameters())


def test_bell_step_cost_in_gradient_evaluations():
    "2m - 1 gradient evaluations for one inner step (m at theta, the first reused on the path), m + m*s - 1 in general."
    net, tasks = _net_and_tasks()
    calls = []
    counting = lambda out, y: (calls.append(1), F.cross_entropy(out, y))[1]
    bell_step(copy.deepcopy(net), tasks, counting, 0.05)
    assert len(calls) == 2 * 3 - 1
    calls.clear(); bell_step(copy.deepcopy(net), tasks, counting, 0.05, inner_steps=3)
    assert len(calls) == 3 + 9 - 1
    calls.clear(); igr_step(copy.deepcopy(net), tasks, counting, 0.05)
    assert len(calls) == 2 * 3
