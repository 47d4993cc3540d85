"The memory bank and MAML replay (notebook 08): resume from a checkpoint, within-task sampling, second-order MAML against double backward, maml_backward against maml_outputs."
from types import SimpleNamespace

import pytest, torch

from tgr.core import TGRError, make_generator, save_artifact, load_artifact
from tgr.models import build_model
from tgr.replay import MemoryBank, Task, maml_backward, maml_loss, maml_outputs


def _task(m):
    g = torch.Generator().manual_seed(m)
    return SimpleNamespace(x=torch.rand(40, 3, 32, 32, generator=g), y=torch.arange(40) % 5,
                           classes=[5 * m + k for k in range(5)], member=m)


def test_replay_bank_resumes_from_a_checkpoint_file(tmp_path):
    "Kill-and-resume: the bank and generator state saved to disk reproduce the next interpolated tasks and MAML loss."
    bank, g = MemoryBank(4), make_generator(3)
    bank.extend(_task(m) for m in range(6))
    save_artifact({"bank": bank.state_dict(), "rng": g.get_state()}, tmp_path / "ck.pt")
    expected = bank.sample_tasks(2, 5, 1, 3, generator=g)
    ck = load_artifact(tmp_path / "ck.pt")
    bank2, g2 = MemoryBank(4).load_state_dict(ck["bank"]), torch.Generator()
    g2.set_state(ck["rng"])
    got = bank2.sample_tasks(2, 5, 1, 3, generator=g2)
    assert all(torch.equal(a.xs, b.xs) and torch.equal(a.xq, b.xq) and a.sources == b.sources for a, b in zip(expected, got))
    assert bank2.uids == [2, 3, 4, 5] and bank2.n_added == 6
    torch.manual_seed(0)
    net = build_model("conv4", 5, 32)
    assert torch.equal(maml_loss(net, expected, inner_steps=1), maml_loss(net, got, inner_steps=1))
    with pytest.raises(TGRError, match="same memory-bank size"): MemoryBank(20).load_state_dict(ck["bank"])


def test_within_task_replay_draws_every_class_from_one_stored_task():
    bank = MemoryBank(6); bank.extend(_task(m) for m in range(6))
    for t in bank.sample_tasks(8, 5, 1, 3, generator=make_generator(0), source="within"):
        assert len({u for u, _ in t.sources}) == 1, t.sources
    assert any(len({u for u, _ in t.sources}) > 1 for t in bank.sample_tasks(8, 5, 1, 3, generator=make_generator(0), source="across"))
    with pytest.raises(TGRError, match="source"): bank.sample_tasks(1, 5, 1, 3, source="mixed")


def test_second_order_maml_equals_double_backward_by_hand():
    "One inner SGD step on a linear model: the meta-gradient through the step, written out with create_graph=True."
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    xs, ys, xq, yq = torch.randn(6, 3, 2, 2).double(), torch.arange(6) % 3, torch.randn(9, 3, 2, 2).double(), torch.arange(9) % 3
    task = Task(xs, ys, xq, yq)
    loss = maml_loss(net, [task], inner_steps=1, inner_lr=0.1)
    g = torch.autograd.grad(loss, list(net.parameters()))
    w, b = [p.detach().clone().requires_grad_() for p in net.parameters()]
    f = lambda w, b, x: x.flatten(1) @ w.T + b
    gw, gb = torch.autograd.grad(torch.nn.functional.cross_entropy(f(w, b, xs), ys), (w, b), create_graph=True)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(f(w - 0.1 * gw, b - 0.1 * gb, xq), yq), (w, b))
    assert all(torch.allclose(a, r, atol=1e-12) for a, r in zip(g, ref))


def _grads(model, run):
    model.zero_grad(set_to_none=True); out = run()
    return out, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_backward_is_maml_outputs_backward(first_order):
    "Side-by-side tasks (fused BN, one thread each) give vmap's meta-gradient (elementary BN) in float64, and the same query losses."
    torch.manual_seed(0)
    net = build_model("conv4", 5, 16).double()
    g = torch.Generator().manual_seed(1)
    tasks = [(torch.rand(5, 3, 16, 16, generator=g, dtype=torch.float64), torch.arange(5),
              torch.rand(15, 3, 16, 16, generator=g, dtype=torch.float64), torch.arange(5).repeat(3)) for _ in range(3)]
    def vmapped():
        out = maml_outputs(net, tasks, 3, 0.05, first_order, vectorize=True); out.loss.backward(); return out
    ref, g_ref = _grads(net, vmapped)
    got, g_got = _grads(net, lambda: maml_backward(net, tasks, 3, 0.05, first_order))
    assert (g_got - g_ref).norm() <= 1e-10 * g_ref.norm()
    assert torch.allclose(got.query_loss, ref.query_loss, atol=1e-12) and not got.loss.requires_grad


def test_maml_backward_does_not_depend_on_the_thread_count():
    "Each task runs on one thread and gradients are summed in task order: float32 meta-gradients are bitwise equal for 1-3 threads."
    torch.manual_seed(0)
    net = build_model("conv4", 5, 32)
    g = torch.Generator().manual_seed(2)
    tasks = [(torch.rand(5, 3, 32, 32, generator=g), torch.arange(5), torch.rand(15, 3, 32, 32, generator=g), torch.arange(5).repeat(3))
             for _ in range(3)]
    before, grads = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n); grads.append(_grads(net, lambda: maml_backward(net, tasks))[1])
    finally: torch.set_num_threads(before)
    assert all(torch.equal(grads[0], x) for x in grads[1:])
