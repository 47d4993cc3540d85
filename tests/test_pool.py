"Bad inputs to the pool and the models, each with a clear error; resumable pools."
import pytest, torch

from tgr.core import TGRError, ArtifactError
from tgr.data import load_benchmark
from tgr.models import build_model
from tgr.pool import PoolConfig, build_pool, load_pool, pool_dir

CFG = PoolConfig(n_models=2, epochs=1, seed=5)


@pytest.fixture(scope="module")
def train():
    return load_benchmark("glyphs-greek", "train")


def test_unwritable_output_dir(tmp_path, train):
    blocker = tmp_path / "file"; blocker.write_text("not a folder")
    with pytest.raises(TGRError, match="writable"):
        build_pool(CFG, out_dir=blocker / "pools", dataset=train, show_progress=False)


def test_bad_config_values(train):
    with pytest.raises(TGRError, match="choose from"): PoolConfig(archs=("alexnet",)).check()
    with pytest.raises(TGRError, match="lower `way`"): PoolConfig(way=train.n_classes + 1).check(train)
    with pytest.raises(TGRError, match="pool n_models must be an integer >= 1"): PoolConfig(n_models=0).check()
    with pytest.raises(TGRError, match="class_sampling"): PoolConfig(class_sampling="random").check()
    with pytest.raises(TGRError, match="meta-train classes only"):
        build_pool(CFG, dataset=load_benchmark("glyphs-greek", "test"), show_progress=False)


def test_corrupt_member_is_reported_then_rebuilt(tmp_path, train):
    pool = build_pool(CFG, out_dir=tmp_path, dataset=train, show_progress=False)
    f = pool.path / "member_0001.pt"
    good = f.read_bytes(); f.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="member_0001.pt"): load_pool(pool.path)
    again = build_pool(CFG, out_dir=tmp_path, dataset=train, show_progress=False)
    assert torch.equal(again[1].weights["head.weight"], pool[1].weights["head.weight"])


def test_missing_members_are_named(tmp_path, train):
    pool = build_pool(CFG, out_dir=tmp_path, dataset=train, show_progress=False)
    (pool.path / "member_0000.pt").unlink()
    with pytest.raises(TGRError, match=r"missing members \[0\]"): load_pool(pool.path)
    with pytest.raises(TGRError, match="not a pool folder"): load_pool(tmp_path)


def test_wrong_image_size_or_channels():
    m = build_model("conv4", 5, 32)
    with pytest.raises(TGRError): m(torch.rand(2, 3, 28, 28))
    with pytest.raises(TGRError): m(torch.rand(2, 1, 32, 32))
    with pytest.raises(TGRError): build_model("vgg11", 5, 32)


def test_pool_folder_is_keyed_by_the_data(tmp_path, train):
    "Same config, other images: another pool folder (a changed benchmark can never reuse stale members)."
    other = load_benchmark("glyphs-cyrillic", "train")
    assert pool_dir(CFG, tmp_path, train) == pool_dir(CFG, tmp_path, train)
    assert pool_dir(CFG, tmp_path, train) != pool_dir(CFG, tmp_path, other)
