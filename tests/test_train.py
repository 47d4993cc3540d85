"One evaluation rule, the initial weights as a selection candidate, within-task replay and the real-data oracle."
from dataclasses import replace
from types import SimpleNamespace

import pytest, torch

from tgr.runs import PRESETS
from tgr.core import TGRError
from tgr.data import load_benchmark
from tgr.evaluate import head_rule
from tgr.models import build_model
from tgr.pool import build_pool
from tgr.replay import MemoryBank
from tgr.train import meta_train, real_task

SMOKE = PRESETS["smoke"]


def test_head_rule_is_one_rule_for_every_model():
    net = build_model("conv4", 5, 32)
    zero = head_rule(net, 5, "zero")
    assert zero.head.weight.abs().sum() == 0 and zero.head.bias.abs().sum() == 0
    assert torch.equal(head_rule(net, 5, "keep").head.weight, net.head.weight)          # a fitting head is kept
    assert head_rule(net, 3, "keep").head.weight.abs().sum() == 0                      # one that does not fit is zeroed
    assert torch.equal(head_rule(net, 5, "zero").encoder.block1.conv.weight, net.encoder.block1.conv.weight)
    with pytest.raises(TGRError, match="choose one of"): head_rule(net, 5, "random")


def test_config_names_the_allowed_rules():
    with pytest.raises(TGRError, match="test_head must be one of"): replace(SMOKE, test_head="mine").check()
    with pytest.raises(TGRError, match="replay_source must be one of"): replace(SMOKE, replay_source="all").check()
    with pytest.raises(TGRError, match="replay_updates must be an integer >= 1"): replace(SMOKE, replay_updates=0).check()


def test_within_replay_draws_every_class_from_one_stored_task():
    bank, g = MemoryBank(5), torch.Generator().manual_seed(0)
    for u in range(4):
        bank.add(SimpleNamespace(x=torch.rand(50, 3, 8, 8), y=torch.arange(5).repeat_interleave(10),
                                 classes=[5 * u + k for k in range(5)], member=u))
    within = bank.sample_tasks(8, 5, 1, 3, generator=g, source="within")
    assert all(len({uid for uid, _ in t.sources}) == 1 for t in within)
    assert len({t.sources[0][0] for t in within}) > 1                                   # the stored task is drawn at random
    across = bank.sample_tasks(8, 5, 1, 3, generator=g)
    assert all(len({uid for uid, _ in t.sources}) == 4 for t in across)                 # the paper's: as many as possible
    with pytest.raises(TGRError, match="source must be one of"): bank.sample(5, 1, 3, source="any")


def test_real_task_is_real_images_of_the_teachers_classes():
    train = load_benchmark("glyphs", "train")
    pool = build_pool(SMOKE.pool_config(), show_progress=False)
    t = real_task(pool[0], train, per_class=4, seed=1)
    assert t.x.shape == (20, 3, 32, 32) and t.y.tolist() == [k for k in range(5) for _ in range(4)]
    assert t.classes == list(pool[0].classes) and t.settings["recovery"] == "real"
    for k, c in enumerate(pool[0].classes):                                             # every image is one of its class's
        own = train.get(train.indices_of(c))[0]
        assert all((own == x).flatten(1).all(1).any() for x in t.x[t.y == k])
    assert not torch.equal(t.x, real_task(pool[0], train, 4, seed=2).x)
    with pytest.raises(TGRError, match="lower inv_per_class"): real_task(pool[0], train, per_class=1000, seed=0)


def test_initial_weights_are_a_selection_candidate(tmp_path):
    "With a vanishing meta learning rate no epoch beats epoch 0 (ties keep the earlier), and the run says so."
    cfg = replace(SMOKE, meta_lr=1e-12, epochs=2, eval_every=1, replay=False)
    tr = meta_train(cfg, tmp_path/"run", show_progress=False)
    assert tr.best_epoch == 0 and tr.init_val_acc is not None and tr.best_val_acc == tr.init_val_acc
    torch.manual_seed(cfg.seed); init = build_model(cfg.meta_arch, cfg.way, 32)   # the seeded initialisation = Finetune's
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(tr.model.state_dict().values(), init.state_dict().values()))
