"""A researcher's own data and trained models: folder benchmarks keyed by content, files others can read, images
checked where they enter, a trained meta-model loaded back and tested elsewhere."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import write_folder
from tgr.core import TGRError, cache_dir, load_artifact, load_json, save_artifact, save_json
from tgr.data import load_benchmark
from tgr.pool import PoolConfig, pool_dir
from tgr.train import load_meta_model

CLI = [sys.executable, "-c", "from tgr.cli import main; main()"]


def test_same_relative_folder_name_gives_two_pools(tmp_path, monkeypatch):
    "`benchmark=data` in two directories whose data/ differ: two pool folders; editing a folder in place: a third."
    write_folder(tmp_path / "a" / "data"); write_folder(tmp_path / "b" / "data", size=44)
    cfg = PoolConfig(benchmark="data", n_models=2, way=2)
    keys = []
    for where in ("a", "b"):
        monkeypatch.chdir(tmp_path / where)
        keys.append(pool_dir(cfg, tmp_path / "cache", load_benchmark("data", "train")))
    img = tmp_path / "b" / "data" / "train" / "a" / "0.png"
    Image.fromarray(np.zeros((44, 44, 3), np.uint8)).save(img)            # an edit in place
    keys.append(pool_dir(cfg, tmp_path / "cache", load_benchmark("data", "train")))
    assert len(set(keys)) == 3, keys


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        for p in (save_json({"a": 1}, tmp_path / "r.json"), save_artifact({"w": torch.ones(2)}, tmp_path / "c.pt")):
            assert p.stat().st_mode & 0o777 == 0o644, oct(p.stat().st_mode)
    finally: os.umask(old)


def test_unreadable_files_and_cache_fail_clearly(tmp_path, monkeypatch):
    p = save_artifact({"w": 1}, tmp_path / "m.pt"); j = save_json({"a": 1}, tmp_path / "r.json")
    def denied(self): raise PermissionError(13, "Permission denied")   # what another user's 0600 file gives (root reads all)
    monkeypatch.setattr(Path, "read_bytes", denied)
    for f in (lambda: load_artifact(p), lambda: load_json(j)):
        with pytest.raises(TGRError, match="not readable by this user"): f()
    monkeypatch.undo()
    monkeypatch.setenv("TGR_CACHE", str(j))                              # a file, not a folder
    with pytest.raises(TGRError, match="set TGR_CACHE to a writable folder"): cache_dir("pools")


def test_images_are_checked_where_they_enter(tmp_path):
    root = write_folder(tmp_path / "f")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "test" / "g" / "9.png")
    with pytest.raises(TGRError, match=r"g/9.png is 30x30.*pass img_size=N|differ in size"):
        load_benchmark(str(root), "test")
    assert load_benchmark(str(root), "test", img_size=32)[0][0].shape == (3, 32, 32)
    (root / "train" / "a" / "0.png").write_bytes(b"not an image")          # sorts first in its split
    r = subprocess.run(CLI + ["run", "--preset", "smoke", f"benchmark={root}", "way=2", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "a/0.png cannot be decoded" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("short") / "run"
    r = subprocess.run(CLI + ["run", "--preset", "smoke", "--out", str(d)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_load_meta_model_and_test_elsewhere(short_run, tmp_path):
    model, info = load_meta_model(short_run)
    res = json.loads((short_run / "results.json").read_text())
    assert info["epoch"] == res["selection"]["best_epoch"] and info["finished"] and not model.training
    assert model(torch.rand(2, 3, model.img_size, model.img_size)).shape == (2, 5)
    args = ["test", "--run", str(short_run), "benchmark=glyphs-cyrillic", "n_test_tasks=5", "shots=[1]"]
    r = subprocess.run(CLI + args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (f,) = (short_run / "meta-test").glob("*.json")
    out = json.loads(f.read_text())
    assert out["config"]["benchmark"] == "glyphs-cyrillic" and set(out["methods"]["tgr"]) == {"5w1s"}
    assert out["methods"]["tgr"]["5w1s"]["n_tasks"] == 5 and set(out["methods"]) >= {"finetune", "best_model"}
    r2 = subprocess.run(CLI + args[:3] + ["benchmark=glyphs-cyrillic", "n_test_tasks=6", "shots=[1]"], capture_output=True, text=True)
    assert r2.returncode == 0 and len(list((short_run / "meta-test").glob("*.json"))) == 2   # no overwrite: one file per setting
    with pytest.raises(TGRError, match="no config.json"): load_meta_model(tmp_path)


def test_overwrite_removes_the_old_results(short_run, tmp_path):
    "An --overwrite killed early must not leave the old results.json beside the new config."
    import shutil
    from tgr.runs import resolve_config
    from tgr.train import meta_train
    d = tmp_path / "run"; shutil.copytree(short_run, d)
    meta_train(resolve_config("smoke", ["seed=5"]), d, overwrite=True, show_progress=False, _stop_after=1)
    assert not (d / "results.json").exists()


def test_replay_accuracy_is_a_percentage(short_run):
    rows = [json.loads(l) for l in (short_run / "metrics.jsonl").read_text().splitlines()]
    accs = [r["replay_acc"] for r in rows if "replay_acc" in r]
    assert accs and max(accs) > 1 and all(0 <= a <= 100 for a in accs)   # % like val_acc (chance is 20 %)


def _glyph_folder(root: Path, domains, per_class: int = 12, classes: int = 16) -> Path:
    "A folder of real images in the layout a user has: root/<script>/<letter>/<k>.png (glyph images as stand-ins)."
    for split in ("train", "val", "test"):
        ds = load_benchmark("glyphs", split)
        for c in range(ds.n_classes):
            dom = ds.domain[c]
            if dom not in domains or len(list((root / dom).glob("*"))) >= classes: continue
            folder = root / dom / f"{split}{c:03d}"; folder.mkdir(parents=True)
            for k, i in enumerate(ds.indices_of(c)[:per_class].tolist()):
                Image.fromarray(ds.get_uint8([i])[0].permute(1, 2, 0).numpy()).save(folder / f"{k}.png")
    return root


def test_own_folder_split_run_and_test_elsewhere(tmp_path):
    "The README's 'Bring your own data': tgr split, tgr run on the split folder, tgr test on another folder."
    _glyph_folder(tmp_path / "scripts", ("latin", "greek")); _glyph_folder(tmp_path / "other", ("cyrillic",))
    r = subprocess.run(CLI + ["split", str(tmp_path / "scripts"), str(tmp_path / "data")], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout, r.stderr
    r = subprocess.run(CLI + ["split", str(tmp_path / "other"), str(tmp_path / "other_split"), "--val", "0.1", "--test", "0.6"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = subprocess.run(CLI + ["run", "--preset", "smoke", f"benchmark={tmp_path / 'data'}", "--out", str(run)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["checksums"]["benchmark"] and res["config"]["benchmark"] == str(tmp_path / "data")
    r = subprocess.run(CLI + ["test", "--run", str(run), f"benchmark={tmp_path / 'other_split'}", "shots=[1]", "query=5"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (f,) = (run / "meta-test").glob("*.json")
    out = json.loads(f.read_text())
    assert out["trained_on"]["benchmark"] == str(tmp_path / "data") and out["methods"]["tgr"]["5w1s"]["n_tasks"] == 20
