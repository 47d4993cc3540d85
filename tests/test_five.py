"FIVE (FREE Sec. 4.1, Algorithm 1): first-order meta-gradient, adaptation, untouched inputs, checkpoints, bad inputs."
import copy

import pytest, torch
import torch.nn as nn
import torch.nn.functional as F

from tgr.core import TGRError
from tgr.five import FiveConfig, MetaGenerator, five_config, five_recover, generator_loss
from tgr.inversion import BNStatHooks, generator_forward, recover_task
from tgr.models import build_model


pytestmark = pytest.mark.usefixtures("one_thread")      # fixture in conftest.py


TINY = dict(z_dim=8, ngf=4)


def _teacher(seed=0, n=3, sharp=1.0):
    "A Conv4 for 16 px images with non-trivial BN running statistics, frozen in eval mode."
    torch.manual_seed(seed)
    t = build_model("conv4", n, 16)
    t.train(); t(torch.rand(64, 3, 16, 16))
    with torch.no_grad(): t.head.weight.mul_(sharp)
    return t.eval().requires_grad_(False)


def _latent(seed, key, n, z_dim):
    "Latent codes as recover_task draws them: make_generator(seed, key), one draw for a generator seed, then Z."
    from tgr.core import make_generator
    g = make_generator(seed, key)
    torch.randint(2**62, (1,), generator=g)
    return torch.randn(n, z_dim, generator=g)


def _weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_meta_gradient_is_first_order():
    "One update with SGD (lr 1) moves the meta-generator by exactly the batch mean of grad L_G^k at the adapted weights."
    T1, T2 = _teacher(0), _teacher(1)
    mg = MetaGenerator(16, 3, **TINY, k=3, outer_optimizer="sgd", outer_lr=1.0, bn_weight=0.1, inner_lr=0.01)
    theta = [p.detach().clone() for p in mg.generator.parameters()]

    def by_hand(T, key):
        fast = copy.deepcopy(mg.generator)
        z = nn.Parameter(_latent(3, key, 6, 8)); y = torch.arange(3).repeat_interleave(2)
        opt = torch.optim.Adam([*fast.parameters(), z], lr=0.01)
        with BNStatHooks(T) as h:
            for step in range(4):
                loss = F.cross_entropy(T(generator_forward(fast, z)), y) + 0.1 * h.pop()
                if step < 3: opt.zero_grad(); loss.backward(); opt.step()
        return torch.autograd.grad(loss, list(fast.parameters()))

    g1, g2 = by_hand(T1, 7), by_hand(T2, 9)
    five_recover(mg, [T1, T2], 3, per_class=2, seed=3, member_indices=[7, 9])
    for t0, p, a, b in zip(theta, mg.generator.parameters(), g1, g2):
        torch.testing.assert_close(t0 - p.detach(), (a + b) / 2, rtol=1e-4, atol=1e-6)
    assert mg.n_updates == 1


def test_inner_loop_is_recover_task_from_the_meta_generator():
    "FIVE's k adaptation steps are notebook 04's recovery started from a copy of the meta-generator (same Z, same losses)."
    T = _teacher(0)
    mg = MetaGenerator(16, 3, **TINY, k=3)
    before = _weights(mg.generator)
    t04 = recover_task(T, 3, per_class=2, steps=3, img_size=16, lr=mg.cfg.inner_lr, bn_weight=mg.cfg.bn_weight, seed=5,
                       member_index=4, generator=mg.generator)
    t5 = five_recover(mg, [T], 3, per_class=2, seed=5, member_indices=[4], update=False)[0]
    torch.testing.assert_close(torch.tensor(t5.losses["total"][:3]), torch.tensor(t04.losses["total"]), rtol=1e-5, atol=1e-6)
    assert _same(before, _weights(mg.generator))                     # neither call changed the meta-generator


def test_loss_falls_over_adaptation_steps():
    T = _teacher(0, sharp=20.0)                                       # a teacher with confident, input-dependent logits
    mg = MetaGenerator(16, 3, **TINY, k=8)
    t = five_recover(mg, [T], 3, per_class=4, update=False)[0]
    L = t.losses
    assert len(L["total"]) == 9 and t.best_step == 8
    assert all(a > b for a, b in zip(L["total"], L["total"][1:]))         # every adaptation step lowers L_G
    assert L["total"][-1] < L["total"][0] - 0.1
    assert L["ce"][-1] < L["ce"][0] and L["bn"][-1] < L["bn"][0]
    assert t.x.shape == (12, 3, 16, 16) and 0 <= t.x.min() and t.x.max() <= 1
    assert torch.equal(t.y, torch.arange(3).repeat_interleave(4))


def test_meta_objective_falls_on_a_fixed_batch():
    "With the same teachers and latent codes every time, the outer loop lowers L_G^k: the meta-gradient points downhill."
    Ts = [_teacher(s, sharp=20.0) for s in range(2)]
    mg = MetaGenerator(16, 3, **TINY, k=2, outer_lr=0.01)
    Lk = []
    for _ in range(25):
        tasks = five_recover(mg, Ts, 3, per_class=4, seed=0, member_indices=[0, 1])
        Lk.append(sum(t.losses["total"][-1] for t in tasks) / 2)
    assert sum(Lk[-5:]) / 5 < 0.95 * sum(Lk[:5]) / 5 and Lk[-1] < Lk[0]


def test_inputs_untouched_and_update_switch():
    T = _teacher(2); T.head.weight.requires_grad_(True)                # odd flags must come back as they were
    student = build_model("conv4", 3, 16).train()
    student(torch.rand(8, 3, 16, 16)).sum().backward()               # a meta-model mid-step: train mode, .grad set

    def snap(m):
        return (_weights(m), [p.requires_grad for p in m.parameters()], [x.training for x in m.modules()],
                [None if p.grad is None else p.grad.clone() for p in m.parameters()])

    def check(m, s):
        w, rg, tr, gr = s
        assert _same(w, _weights(m))
        assert [p.requires_grad for p in m.parameters()] == rg and [x.training for x in m.modules()] == tr
        assert all((p.grad is None and g is None) or torch.equal(p.grad, g) for p, g in zip(m.parameters(), gr))
        assert all(len(x._forward_hooks) == 0 and len(x._forward_pre_hooks) == 0 for x in m.modules())

    s_T, s_S = snap(T), snap(student)
    for policy in ("batch", "running"):
        mg = MetaGenerator(16, 3, **TINY, k=2, student_bn=policy)
        w0 = _weights(mg.generator)
        fixed = five_recover(mg, [T, _teacher(0)], 3, per_class=2, student=student, seed=1, update=False)
        assert _same(w0, _weights(mg.generator)) and mg.n_updates == 0
        check(T, s_T); check(student, s_S)
        moved = five_recover(mg, [T, _teacher(0)], 3, per_class=2, student=student, seed=1)
        assert not _same(w0, _weights(mg.generator)) and mg.n_updates == 1
        assert all(torch.equal(a.x, b.x) for a, b in zip(fixed, moved))   # the update follows the batch's tasks
        check(T, s_T); check(student, s_S)


def test_eta_gate():
    "Where teacher and student disagree on every image, the KL term is zero and the run equals the student-free one."
    class Rolled(nn.Module):
        def __init__(self, t): super().__init__(); self.t = t
        def forward(self, x): return self.t(x).roll(1, dims=1)
    T = _teacher(0, sharp=5.0)
    mg = MetaGenerator(16, 3, **TINY, k=3, student_bn="running")
    plain = five_recover(mg, [T], 3, per_class=3, update=False)[0]
    rolled = five_recover(mg, [T], 3, per_class=3, student=Rolled(copy.deepcopy(T)), update=False)[0]
    assert rolled.losses["agree"] == [0.0] * 4 and rolled.losses["kl"] == [0.0] * 4
    assert torch.equal(rolled.x, plain.x)
    logits = torch.randn(6, 3)
    L = generator_loss(logits, torch.zeros(6, dtype=torch.long), logits * 2)   # same argmax: every gate open
    assert L.agree == 1.0 and L.kl > 0 and abs(L.total.item() - (L.ce - L.kl)) < 1e-6


def test_same_seed_same_tasks_and_exact_resume(tmp_path):
    Ts = [_teacher(0), _teacher(1)]

    def step(mg, s): return five_recover(mg, Ts, 3, per_class=2, seed=s, member_indices=[0, 1])

    a, b = MetaGenerator(16, 3, **TINY, k=2), MetaGenerator(16, 3, **TINY, k=2)
    ta, tb = step(a, 0), step(b, 0)
    assert all(torch.equal(x.x, y.x) for x, y in zip(ta, tb)) and _same(_weights(a.generator), _weights(b.generator))
    step(a, 1)
    state = a.state_dict()
    saved = {k: v.clone() for k, v in state["generator"].items()}
    torch.save(state, tmp_path/"mg.pt")
    resumed = MetaGenerator.from_state_dict(torch.load(tmp_path/"mg.pt", weights_only=True))
    x_a, x_r = step(a, 2), step(resumed, 2)
    assert all(torch.equal(x.x, y.x) for x, y in zip(x_a, x_r))
    assert _same(_weights(a.generator), _weights(resumed.generator)) and resumed.n_updates == a.n_updates == 3
    assert _same(saved, state["generator"])                           # the snapshot is a copy, not a live view
    other = MetaGenerator(16, 3, **TINY, k=2).load_state_dict(state)  # into an existing one, settings included
    assert other.n_updates == 2 and other.cfg == a.cfg


def test_clear_errors():
    T = _teacher(0)
    mg = MetaGenerator(16, 3, **TINY)
    cases = [
        (lambda: five_recover(mg, [T], 3, k=0), "k must be an integer >= 1"),
        (lambda: five_recover(mg, [T], 4), "has only 3 outputs"),
        (lambda: five_recover(mg, [build_model("conv4", 3, 32)], 3), "MetaGenerator(img_size=32"),
        (lambda: five_recover(mg, [build_model("conv4", 3, 16, in_ch=1)], 3), "1-channel"),
        (lambda: five_recover(mg, [T, T], [3, 3, 3]), "one per teacher"),
        (lambda: five_recover(mg, [T], 3, classes=[[0, 1]]), "one global id per label"),
        (lambda: five_recover(mg, [T], 3, per_class=0), "per_class must be an integer >= 1"),
        (lambda: five_recover(mg, [T], 3, student=build_model("conv4", 5, 16)), "as many outputs"),
        (lambda: five_recover(mg, [], 3), "no teachers"),
        (lambda: five_recover(mg, [object()], 3), "must be a torch nn.Module"),
        (lambda: five_recover(T, [T], 3), "meta_gen must be a MetaGenerator"),
        (lambda: five_recover(mg, [T], 3, seed=1.5), "seed must be an integer"),
        (lambda: five_config(inner_optimizer="lbfgs"), "choose one of"),
        (lambda: FiveConfig(bn_weight=-1.0), "bn_weight must be a finite number >= 0"),
        (lambda: MetaGenerator(32, 3, **TINY).load_state_dict(mg.state_dict()), "from_state_dict"),
        (lambda: mg.load_state_dict({"weights": {}}), "not a MetaGenerator state"),
    ]
    for fn, msg in cases:
        with pytest.raises(TGRError) as e: fn()
        assert msg in str(e.value), (msg, str(e.value))

    class NaNTeacher(nn.Module):
        def forward(self, x): return x.mean((2, 3)) * float("nan")
    with pytest.raises(TGRError, match="the FIVE loss of teacher 0 became nan at step 0"), \
         pytest.warns(UserWarning, match="no BatchNorm layers"):
        five_recover(mg, [NaNTeacher()], 3, per_class=2, update=False)
