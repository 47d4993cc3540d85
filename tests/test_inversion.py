"Task recovery by inversion (notebook 04): the loss falls, hooks and teacher are left as found, the one inversion loop, settings as an InversionConfig, bad inputs."
import numpy as np
import pytest
import torch
from torch import nn

from tgr.core import TGRError
from tgr.models import Generator, build_model
from tgr.inversion import InversionConfig, inversion_loop, recover_task


pytestmark = pytest.mark.usefixtures("one_thread_tmp_cache")


def test_inversion_loss_falls():
    torch.manual_seed(0)
    teacher = build_model("conv4", 4, 32)
    for m in teacher.modules():                  # BN statistics of "training data": uniform noise images
        if isinstance(m, nn.BatchNorm2d): m.momentum = None
    with torch.no_grad(): teacher.train()(torch.rand(256, 3, 32, 32))
    task = recover_task(teacher.eval(), 4, per_class=4, steps=25, ngf=16, lr=0.01)
    L = task.losses["total"]
    assert len(L) == 25 and np.mean(L[-5:]) < 0.7 * np.mean(L[:5])
    assert task.best_step == int(np.argmin(L))
    x, y = task
    assert x.shape == (16, 3, 32, 32) and torch.equal(y, torch.arange(4).repeat_interleave(4))


@pytest.mark.parametrize("arch", ["conv4", "resnet10"])
def test_hooks_are_removed_and_teacher_unchanged(arch):
    torch.manual_seed(0)
    teacher = build_model(arch, 5, 32).train()
    flags = [p.requires_grad for p in teacher.parameters()]
    probe = torch.rand(4, 3, 32, 32)
    teacher.eval(); before = teacher(probe).detach(); teacher.train()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    recover_task(teacher, 5, per_class=2, steps=2, ngf=8)
    assert all(len(m._forward_hooks) == 0 for m in teacher.modules())
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags
    for k, v in teacher.state_dict().items(): assert torch.equal(v, state[k]), k   # running stats untouched
    teacher.eval(); assert torch.equal(teacher(probe), before)
    with pytest.raises(TGRError, match="n_classes"):                        # an error inside the hooked loop
        recover_task(teacher, 9, per_class=1, steps=2, ngf=8)
    assert all(len(m._forward_hooks) == 0 for m in teacher.modules())


def test_teacher_without_bn_warns_and_uses_ce_only():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    with pytest.warns(UserWarning, match="no BatchNorm"):
        t = recover_task(teacher, 3, per_class=2, steps=2, ngf=8)
    assert t.settings["use_bn"] is False and max(t.losses["bn"]) == 0
    with pytest.raises(TGRError, match="no loss term"): recover_task(teacher, 3, per_class=2, steps=2, ngf=8, use_ce=False)


def test_settings_come_as_a_config_a_preset_or_keywords():
    torch.manual_seed(0)
    teacher = build_model("conv4", 3, 32)
    cfg = InversionConfig(per_class=2, steps=3, ngf=8, lr=0.01)
    a = recover_task(teacher, 3, cfg)
    b = recover_task(teacher, 3, per_class=2, steps=3, ngf=8, lr=0.01)
    c = recover_task(teacher, 3, {"per_class": 2, "steps": 3, "ngf": 8, "lr": 0.01})
    assert torch.equal(a.x, b.x) and torch.equal(a.x, c.x) and a.losses == b.losses
    assert recover_task(teacher, 3, "demo", steps=2).settings["ngf"] == 32      # a preset with an override
    with pytest.raises(TGRError, match="unknown inversion setting"): recover_task(teacher, 3, cfg, n_steps=3)


def test_inversion_loop_keeps_the_best_step_and_stops_on_nan():
    torch.manual_seed(0)
    G, z = Generator(z_dim=8, ngf=8, img_size=16), nn.Parameter(torch.randn(4, 8))
    opt = torch.optim.Adam([*G.parameters(), z], lr=0.05)
    def loss(x, step): l = (x - 0.25).pow(2).mean(); return l, {"total": l.item()}
    tr = inversion_loop(G, z, loss, 30, opt)
    assert len(tr.losses["total"]) == len(tr.step_seconds) == 30
    assert tr.best_step == int(np.argmin(tr.losses["total"])) and tr.best < tr.losses["total"][0]
    seen = []
    tr = inversion_loop(G, z, loss, 2, opt, then=lambda total: seen.append(total.requires_grad), then_grad=False)
    assert len(tr.losses["total"]) == 3 and seen == []                  # the extra batch is scored, nothing is called
    with pytest.raises(TGRError, match="became nan at step 0; lower lr"):
        inversion_loop(G, z, lambda x, s: (x.sum() * float("nan"), {"total": float("nan")}), 3, opt, fix="lower lr")
