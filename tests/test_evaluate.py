"Meta-test protocol and baselines: exact chance level, shared seeded episodes, bad inputs, and the replay bank's resume."
import math
from types import SimpleNamespace

import pytest, torch

from tgr.core import TGRError, make_generator, save_artifact, load_artifact
from tgr.data import load_benchmark
from tgr.evaluate import (BASELINES, HEAD_INITS, build_baseline, confidence_interval, evaluate_baselines, meta_test,
                          reset_head, results_table)
from tgr.models import build_model
from tgr.pool import Pool, PoolMember


@pytest.fixture(scope="module")
def test_split():
    return load_benchmark("glyphs-greek", "test")          # 7 classes, 100 images each


def _pool(n=3, archs=("conv4",), seed=0):
    "Untrained stand-in members: enough to check how baselines are built (no training needed)."
    members = []
    for i in range(n):
        torch.manual_seed(seed + i)
        arch = archs[i % len(archs)]
        net = build_model(arch, 5, 32) if arch == "conv4" else build_model(arch, 5, 16)
        members.append(PoolMember(index=i, arch=arch, classes=list(range(5 * i, 5 * i + 5)), class_names=["x"] * 5,
                                  class_domains=["greek"] * 5, heldout_acc=[0.7, 0.9, 0.9, 0.5][i % 4],
                                  img_size=net.img_size, in_ch=3,
                                  weights={k: v.clone() for k, v in net.state_dict().items()}))
    return Pool(members)


def _zero_head_model(way=5):
    net = build_model("conv4", way, 32)
    with torch.no_grad(): net.head.weight.zero_(); net.head.bias.zero_()
    return net


@pytest.mark.parametrize("way", [3, 5])
def test_zero_head_without_steps_is_exactly_chance(test_split, way):
    r = meta_test(_zero_head_model(way), test_split, way, 1, query=4, n_tasks=5, inner_steps=0, show_progress=False)
    assert r.accs == [100 / way] * 5 and r.ci95 == 0.0 and r.n_tasks == 5


def test_every_method_sees_the_same_episodes(test_split):
    kw = dict(query=4, n_tasks=4, inner_steps=1, seed=11, show_progress=False)
    a = meta_test(_zero_head_model(), test_split, 5, 1, **kw)
    b = meta_test(build_model("conv4", 5, 32), test_split, 5, 1, **kw)
    c = meta_test(build_model("conv4", 5, 32), test_split, 5, 1, **{**kw, "seed": 12})
    assert a.episodes == b.episodes != c.episodes


def test_curve_and_final_accuracy_agree(test_split):
    net = reset_head(build_model("conv4", 5, 32), 5, "zero")
    r = meta_test(net, test_split, 5, 2, query=4, n_tasks=3, inner_steps=3, eval_steps=[0, 1], show_progress=False)
    assert sorted(r.curve) == [0, 1, 3] and math.isclose(r.curve[3], r.acc) and r.curve[0] == 20.0


def test_confidence_interval():
    mean, half = confidence_interval([50.0, 60.0, 70.0])
    assert mean == 60.0 and math.isclose(half, 1.96 * 10.0 / math.sqrt(3))
    assert math.isnan(confidence_interval([42.0])[1])
    with pytest.raises(TGRError, match="at least one task"): confidence_interval([])


def test_bad_inputs_are_explained(test_split):
    net = build_model("conv4", 5, 32)
    with pytest.raises(TGRError, match=r"reset_head\(model, 5\)"): meta_test(build_model("conv4", 4, 32), test_split, 5, 1, n_tasks=1)
    with pytest.raises(TGRError, match="resize the images"): meta_test(build_model("conv4", 5, 64), test_split, 5, 1, n_tasks=1)
    with pytest.raises(TGRError, match="inner_steps must be an integer >= 0"): meta_test(net, test_split, 5, 1, inner_steps=-1)
    with pytest.raises(TGRError, match="n_episodes must be an integer >= 1"): meta_test(net, test_split, 5, 1, n_tasks=0)
    with pytest.raises(TGRError, match="lower `way`"): meta_test(net, test_split, 8, 1, n_tasks=1)
    with pytest.raises(TGRError, match="within 0..inner_steps"): meta_test(net, test_split, 5, 1, n_tasks=1, eval_steps=[11])
    with pytest.raises(TGRError, match="FewShotDataset"): meta_test(net, [(torch.rand(3, 32, 32), 0)], 5, 1)
    with pytest.raises(TGRError, match="choose one of"): reset_head(net, 5, "xavier")


def test_baselines_are_built_from_the_pool():
    pool = _pool(4)
    assert set(BASELINES) == {"finetune", "best_model", "average"} and set(HEAD_INITS) == {"zero", "random", "keep"}
    best = build_baseline("best_model", pool, head="keep")            # members 1 and 2 tie at 0.9: the lower index wins
    assert torch.equal(best.state_dict()["encoder.block1.conv.weight"], pool[1].weights["encoder.block1.conv.weight"])
    avg = build_baseline("average", pool).state_dict()
    want = torch.stack([m.weights["encoder.block3.conv.weight"] for m in pool]).mean(0)
    assert torch.allclose(avg["encoder.block3.conv.weight"], want, atol=1e-7)
    assert avg["head.weight"].abs().sum() == 0 and tuple(avg["head.weight"].shape) == (5, 128)
    f0, f0b, f1 = (build_baseline("finetune", pool, seed=s).state_dict()["encoder.block1.conv.weight"] for s in (0, 0, 1))
    assert torch.equal(f0, f0b) and not torch.equal(f0, f1)
    assert build_baseline("average", pool, way=3).head.out_features == 3


def test_average_uses_one_architecture():
    pool = _pool(3, archs=("conv4", "resnet10", "conv4"))
    avg = build_baseline("average", pool)                            # the most common architecture: conv4
    assert avg.arch == "conv4"
    want = (pool[0].weights["encoder.block1.conv.weight"] + pool[2].weights["encoder.block1.conv.weight"]) / 2
    assert torch.allclose(avg.state_dict()["encoder.block1.conv.weight"], want, atol=1e-7)
    assert build_baseline("average", pool, arch="resnet10").arch == "resnet10"
    with pytest.raises(TGRError, match="no 'resnet18' members"): build_baseline("average", pool, arch="resnet18")
    with pytest.raises(TGRError, match="pool is empty"): build_baseline("best_model", Pool([]))


def test_evaluate_baselines_table(test_split):
    res = evaluate_baselines(_pool(2), test_split, 5, 1, names=("finetune", "average"), query=3, n_tasks=2,
                             inner_steps=1, show_progress=False)
    assert list(res) == ["finetune", "average"] and res["finetune"].episodes == res["average"].episodes
    table = results_table({n: {"5-way 1-shot": r} for n, r in res.items()})
    assert "finetune" in table and "±" in table
    with pytest.raises(TGRError, match="unknown baseline"): evaluate_baselines(_pool(2), test_split, 5, 1, names=("maml",))
