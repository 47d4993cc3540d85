"Loaders on fixture trees, bad inputs, and the glyph benchmark's pinned checksum."
import numpy as np, pytest, torch

from tgr.core import TGRError
from tgr.data import (GLYPH_SHA256, EpisodeSampler, GlyphSpec, build_glyphs, glyph_data, glyph_checksum, glyph_masks,
                      load_benchmark, render_glyph_masks, split_lists)
from fixtures import write_cifar100, write_cub, write_folder, write_mini_imagenet


def test_split_lists_are_disjoint_and_complete():
    for name, sizes in {"cifar-fs": (64, 16, 20), "mini-imagenet": (64, 16, 20), "cub": (100, 50, 50)}.items():
        sl = split_lists(name)
        assert tuple(len(sl[s]) for s in ("train", "val", "test")) == sizes
        assert len(set(sl["train"]) | set(sl["val"]) | set(sl["test"])) == sum(sizes)
        assert sl["source"]


def test_cifar_fs(tmp_path):
    root = write_cifar100(tmp_path)
    for split, n in (("train", 64), ("val", 16), ("test", 20)):
        ds = load_benchmark("cifar-fs", split, root=root)
        assert ds.n_classes == n and len(ds) == n * 4 and ds.img_size == 32
        assert ds.classes == split_lists("cifar-fs")[split] and set(ds.domain) == {"cifar-fs"}
    x, y = load_benchmark("cifar-fs", "val", root=root, img_size=84)[0]
    assert x.shape == (3, 84, 84) and 0 <= x.min() and x.max() <= 1


def test_cifar_fs_errors(tmp_path):
    with pytest.raises(TGRError, match="cifar-100-python"): load_benchmark("cifar-fs", "train", root=tmp_path)
    with pytest.raises(TGRError, match="needs `root=`"): load_benchmark("cifar-fs", "train")
    (tmp_path / "cifar-100-python").mkdir()
    for f in ("train", "test", "meta"): (tmp_path / "cifar-100-python" / f).write_bytes(b"garbage")
    with pytest.raises(TGRError, match="re-download"): load_benchmark("cifar-fs", "train", root=tmp_path)


def test_mini_imagenet(tmp_path):
    root = write_mini_imagenet(tmp_path)
    ds = load_benchmark("mini-imagenet", "test", root=root)
    assert ds.n_classes == 20 and len(ds) == 60 and ds[0][0].shape == (3, 84, 84)
    xs, ys, xq, yq = EpisodeSampler(ds, way=5, shot=1, query=2, n_episodes=2, seed=0)[1]
    assert xs.shape == (5, 3, 84, 84) and xq.shape == (10, 3, 84, 84)
    (root / "val.csv").write_text("file,class\nx.jpg,n0\n")
    with pytest.raises(TGRError, match="header 'filename,label'"): load_benchmark("mini-imagenet", "val", root=root)
    with pytest.raises(TGRError, match="cannot be downloaded"): load_benchmark("mini-imagenet", "val", root=root, download=True)


def test_cub(tmp_path):
    root = write_cub(tmp_path)
    sizes = {s: load_benchmark("cub", s, root=root).n_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 100, "val": 50, "test": 50}
    ds = load_benchmark("cub", "val", root=root)
    assert ds.classes[0] == sorted(ds.classes)[0] and ds[0][0].shape == (3, 84, 84)
    with pytest.raises(TGRError, match="200 class folders"):
        next((root / "CUB_200_2011" / "images").iterdir()).rename(root / "moved")
        load_benchmark("cub", "train", root=root)


def test_folder_and_union(tmp_path):
    root = write_folder(tmp_path / "f")
    ds = load_benchmark(str(root), "train")
    assert ds.classes == ["a", "b", "c"] and ds.img_size == 40
    with pytest.raises(TGRError, match="ROOT/train/<class name>"): load_benchmark(str(tmp_path), "train")
    cif = write_cifar100(tmp_path / "c")
    u = load_benchmark("cifar-fs+glyphs-greek", "test", root={"cifar-fs": cif, "glyphs-greek": None})
    assert u.img_size == 32 and set(u.domain) == {"cifar-fs", "greek"}
    assert u.n_classes == 20 + load_benchmark("glyphs-greek", "test").n_classes


def test_glyph_splits_and_domains():
    dss = {s: load_benchmark("glyphs", s) for s in ("train", "val", "test")}
    assert sum(d.n_classes for d in dss.values()) >= 150
    for s, d in dss.items():
        assert set(d.domain) == {"latin", "greek", "cyrillic"}, s
        assert int(d.counts().min()) >= 100 and d.img_size == 32 and d.in_ch == 3
    assert not set(dss["train"].classes) & set(dss["test"].classes)
    # ~64/16/20 within each domain
    for dom in ("latin", "greek", "cyrillic"):
        n = [sum(x == dom for x in dss[s].domain) for s in ("train", "val", "test")]
        assert abs(n[0] / sum(n) - 0.64) < 0.05 and abs(n[2] / sum(n) - 0.20) < 0.05


# One checksum for every machine: the masks ship with the package and the rest is exact float64 arithmetic.
PINNED = "52f37078fed7be3332d833dbe60042c01d8f34314304a17d1e50feb09c40ff38"


def test_glyph_checksum_is_pinned(tmp_path, monkeypatch):
    monkeypatch.setenv("TGR_CACHE", str(tmp_path))
    data = build_glyphs(GlyphSpec(), progress=False)
    assert glyph_checksum(data) == PINNED == GLYPH_SHA256
    assert glyph_checksum(glyph_data(GlyphSpec())) == PINNED          # built into the cache and read back
    assert glyph_checksum(glyph_data(GlyphSpec())) == PINNED
    assert list(tmp_path.glob("glyphs/glyphs-v2-*.pt"))                # the version key changed with the renderer


def test_glyph_masks_shipped_and_close_to_a_fresh_render():
    meta, masks = glyph_masks()
    assert masks.shape == (len(meta["letters"]), 16, 3, 64, 64) and masks.dtype == np.uint8
    fresh = render_glyph_masks(meta["letters"][:4])                    # this machine's FreeType may differ by a grey level
    assert np.abs(fresh.astype(float) - masks[:4]).mean() / 255 < 0.01


def test_fingerprint_follows_the_content(tmp_path):
    "Two folders with the same layout but other images get other fingerprints and benchmark checksums; the same one, the same."
    from tgr.data import benchmark_checksum
    a = write_folder(tmp_path / "a" / "data")
    b = write_folder(tmp_path / "b" / "data", size=44)                     # same class names and files, other pixels
    fa, fb = (load_benchmark(str(r), "train").fingerprint() for r in (a, b))
    assert fa != fb and fa == load_benchmark(str(a), "train").fingerprint()
    assert benchmark_checksum(str(a)) != benchmark_checksum(str(b))
    glyphs = load_benchmark("glyphs-greek", "test")
    assert glyphs.fingerprint() == load_benchmark("glyphs-greek", "test").fingerprint() != fa
