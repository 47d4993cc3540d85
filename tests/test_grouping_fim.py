"Diagonal Fisher, dissimilarity and grouping: exact checks against naive versions, cache keys, bad inputs."
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tgr.core import TGRError
from tgr.models import build_model
from tgr.pool import Pool, PoolMember
from tgr.inversion import InversionConfig, RecoveredTask, recover_task, recover_pool_tasks, task_key
from tgr.fim import (diag_fim, diag_fim_loop, dissimilarity, similarity, embed_pool, embed_task, make_probe,
                     FISHER_LABELS)
from tgr.grouping import group_models, choose_n_groups, task_groups, within_group_mean, random_groupings

TINY = InversionConfig(per_class=2, steps=2, ngf=8)


pytestmark = pytest.mark.usefixtures("one_thread_tmp_cache")


def fake_pool(seed: int, n: int = 4) -> Pool:
    "Untrained Conv4 members with given weights: enough for everything that does not need accurate teachers."
    members = []
    for i in range(n):
        torch.manual_seed(1000 * seed + i)
        m = build_model("conv4", 3, 32)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5); mod.running_var.uniform_(0.5, 2)
        members.append(PoolMember(index=i, arch="conv4", classes=[i, i + 1, i + 2], class_names=["a", "b", "c"],
                                  class_domains=["latin"] * 3, heldout_acc=0.5, img_size=32, in_ch=3,
                                  weights={k: v.clone() for k, v in m.state_dict().items()}))
    return Pool(members, config={"fake": seed})


def naive_eq6(E, eps=1e-8):
    "Eq. 6 pair by pair, in plain Python over coordinates."
    E = np.asarray(E, dtype=np.float64); E = E / E.mean(); n = len(E); W = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j: continue
            s = E[i] + E[j] + eps
            a, b = E[i] / s, E[j] / s
            W[i, j] = 1 - sum(p * q for p, q in zip(a, b)) / max(np.sqrt((a * a).sum() * (b * b).sum()), eps)
    return W


# --- diagonal Fisher -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mlp", "conv4"])
def test_diag_fim_matches_per_sample_loop(arch):
    torch.manual_seed(0)
    if arch == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))
        x = torch.randn(13, 3, 2, 2); y = torch.randint(0, 4, (13,))
        model.train(); model(torch.randn(32, 3, 2, 2))          # non-trivial running statistics
    else:
        model = build_model("conv4", 5, 32); x = torch.rand(9, 3, 32, 32); y = torch.randint(0, 5, (9,))
    for chunk in (1, 4, 64):
        torch.testing.assert_close(diag_fim(model, x, y, chunk_size=chunk), diag_fim_loop(model, x, y), rtol=1e-5, atol=1e-8)
    # by hand, for the first parameter: mean over samples of the squared gradient of log p(y|x), in eval mode
    model.eval(); p0 = next(model.parameters()); acc = torch.zeros_like(p0)
    for i in range(len(x)):
        lp = torch.log_softmax(model(x[i:i + 1]), -1)[0, y[i]]
        acc += torch.autograd.grad(lp, p0)[0] ** 2 / len(x)
    torch.testing.assert_close(diag_fim(model, x, y)[:p0.numel()], acc.flatten(), rtol=1e-5, atol=1e-8)


def test_diag_fim_weights_subset_and_modes():
    torch.manual_seed(1)
    model = build_model("conv4", 3, 32).train()
    x, y, w = torch.rand(6, 3, 32, 32), torch.randint(0, 3, (6,)), torch.rand(6)
    names = ["encoder.block1.bn.weight", "head.weight"]
    f = diag_fim(model, x, y, params=names, weights=w)
    assert f.shape == (32 + 3 * model.feat_dim,)
    torch.testing.assert_close(f, diag_fim_loop(model, x, y, params=names, weights=w), rtol=1e-5, atol=1e-8)
    assert model.training and model.encoder.block1.bn.training           # the caller's mode is restored
    assert (f >= 0).all()


def test_embedding_label_modes():
    torch.manual_seed(2)
    task = RecoveredTask(torch.rand(12, 3, 32, 32), torch.arange(3).repeat_interleave(4), member_index=0)
    probe = make_probe("random-conv4")
    embs = {lab: embed_task(task, probe, labels=lab) for lab in FISHER_LABELS}
    for lab, e in embs.items():
        assert e.labels == lab and e.params == "encoder" and e.fisher.shape == (probe.n_params(),) and (e.fisher >= 0).all()
    torch.testing.assert_close(embed_task(task, probe, labels="sampled").fisher, embs["sampled"].fisher)   # seeded
    with pytest.raises(TGRError, match="choose one of"): embed_task(task, probe, labels="soft")


# --- Eq. 6 and Appendix E ---------------------------------------------------------------------------------

def test_dissimilarity_properties_and_naive_eq6():
    g = torch.Generator().manual_seed(0)
    E = torch.rand(7, 40, generator=g) ** 3; E[2, :10] = 0; E[5] = 3 * E[4]
    W = dissimilarity(E)
    assert torch.equal(W, W.T) and torch.equal(W.diag(), torch.zeros(7))
    assert W.min() >= 0 and W.max() <= 1
    np.testing.assert_allclose(W.numpy(), naive_eq6(E.numpy()), atol=1e-10)
    assert W[4, 5] < 1e-8                                                   # proportional embeddings: 0
    np.testing.assert_allclose(dissimilarity(E, max_elements=50).numpy(), W.numpy(), atol=1e-12)   # blocking


def test_similarity_is_cosine_of_normalised_embeddings():
    E = torch.rand(5, 30) ** 2
    S = similarity(E)
    U = E.double() / E.double().norm(dim=1, keepdim=True)
    torch.testing.assert_close(S, (U @ U.T).fill_diagonal_(1.0))
    assert torch.equal(S, S.T) and S.min() >= 0


def test_bad_embeddings():
    with pytest.raises(TGRError, match="non-negative"): dissimilarity(-torch.rand(3, 4))
    with pytest.raises(TGRError, match="NaN"): dissimilarity(torch.full((3, 4), float("nan")))
    with pytest.raises(TGRError, match="2-D"): similarity(torch.rand(4))


# --- grouping ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,n_groups", [(5, 1), (9, 3), (20, 5), (20, "auto"), (6, 6)])
@pytest.mark.parametrize("mode", ["dissimilarity", "similarity"])
@pytest.mark.parametrize("method", ["spectral", "balanced"])
def test_groups_partition_the_models(n, n_groups, mode, method):
    E = torch.rand(n, 50, generator=torch.Generator().manual_seed(n)) ** 3
    A = dissimilarity(E) if mode == "dissimilarity" else similarity(E)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = group_models(A, n_groups, seed=0, mode=mode, method=method)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(n)) and len(flat) == n                 # each model exactly once
    assert all(g == sorted(g) and g for g in groups)
    if n_groups != "auto": assert len(groups) == n_groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert group_models(A, n_groups, seed=0, mode=mode, method=method) == groups   # deterministic for a seed
    if method == "balanced": assert max(map(len, groups)) - min(map(len, groups)) <= 1


def _within_sum_brute_force_best(W, k):
    "The largest within-group sum of W over all partitions of range(n) into k groups of equal size (tiny n only)."
    import itertools
    n = len(W); best = -np.inf
    for perm in itertools.permutations(range(n)):
        groups = [perm[i * (n // k):(i + 1) * (n // k)] for i in range(k)]
        best = max(best, sum(W[i, j] for g in groups for a, i in enumerate(g) for j in g[a + 1:]))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_grouping_finds_the_best_equal_size_partition(seed):
    rng = np.random.default_rng(seed)
    W = rng.uniform(0.2, 0.7, (8, 8)); W = (W + W.T) / 2; np.fill_diagonal(W, 0)
    groups = group_models(W, 2, method="balanced", seed=seed, warn_spread=False)
    ours = sum(W[i, j] for g in groups for a, i in enumerate(g) for j in g[a + 1:])
    assert [len(g) for g in groups] == [4, 4]
    assert ours == pytest.approx(_within_sum_brute_force_best(W, 2))


def test_grouping_by_dissimilarity_beats_random_groups():
    fam = np.repeat(np.arange(5), 4)
    W = np.where(fam[:, None] == fam[None, :], 0.1, 0.9); np.fill_diagonal(W, 0)
    groups = group_models(W, 4)
    rand = [within_group_mean(W, r) for r in random_groupings(groups, 300)]
    assert within_group_mean(W, groups) > np.mean(rand)
    S = 1 - W; np.fill_diagonal(S, 1)
    assert choose_n_groups(S, range(2, 9), mode="similarity")[0] == 5


def test_grouping_bad_inputs_and_flat_warning():
    W = dissimilarity(torch.rand(6, 10) ** 2)
    for bad, msg in [(W[:3], "square"), (-W, "non-negative"), (W + torch.triu(torch.ones(6, 6), 1), "symmetric")]:
        with pytest.raises(TGRError, match=msg): group_models(bad, 2)
    for k in (0, 7, 2.5, True):
        with pytest.raises(TGRError, match="n_groups"): group_models(W, k)
    with pytest.raises(TGRError, match="choose one of"): group_models(W, 2, mode="kmeans")
    with pytest.raises(TGRError, match="method 'kmeans' unknown|unknown method"): group_models(W, 2, method="kmeans")
    flat = torch.full((6, 6), 0.3).fill_diagonal_(0)
    with pytest.warns(UserWarning, match="nearly constant"): group_models(flat, 2)
    S = torch.rand(6, 6); S = ((S + S.T) / 2).fill_diagonal_(1)
    with pytest.warns(UserWarning, match="similarity matrix"): group_models(S, 2)


# --- caching: keys follow the pool ------------------------------------------------------------------------

def test_cache_keys_include_the_pool(tmp_path):
    a, b = fake_pool(1), fake_pool(2)
    ga = task_groups(a, 2, TINY, probe="random-conv4", show_progress=False)
    gb = task_groups(b, 2, TINY, probe="random-conv4", show_progress=False)
    assert ga.key != gb.key and not torch.equal(ga.W, gb.W)
    again = task_groups(fake_pool(1), 2, TINY, probe="random-conv4", show_progress=False)
    assert again.key == ga.key and torch.equal(again.W, ga.W)
    swapped = Pool([a[1], a[0], a[2], a[3]], a.config)
    assert task_groups(swapped, 2, TINY, probe="random-conv4", show_progress=False).key != ga.key
    assert task_key(a[0], TINY) != task_key(b[0], TINY)
    # tasks of one pool cannot be embedded as another pool's
    tasks_a = recover_pool_tasks(a, TINY, show_progress=False)
    c = fake_pool(1); c[0].classes = [7, 8, 9]
    with pytest.raises(TGRError, match="does not belong"): embed_pool(c, tasks_a, "random-conv4", show_progress=False)


def test_probe_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TGR_RESNET34_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(TGRError, match="TGR_RESNET34_WEIGHTS"): make_probe("imagenet-resnet34")
    with pytest.raises(TGRError, match="choose one of"): make_probe("clip")
    with pytest.raises(TGRError, match="recovered tasks"): make_probe("distilled")
