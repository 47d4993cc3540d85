import os, pytest

@pytest.fixture(autouse=True, scope="session")
def _quiet_progress():
    "Progress bars off in tests (the glyph benchmark and pools stay in the user cache between runs)."
    os.environ.setdefault("TGR_PROGRESS", "0")
    yield


@pytest.fixture(scope="module")
def one_thread():
    "Tiny tensors: one torch thread avoids thread hand-off costs (and contention on a shared machine); restored after."
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread_tmp_cache(tmp_path, monkeypatch):
    "One torch thread and an empty tgr cache under tmp_path, for tests that must not see or leave cached artifacts."
    import torch
    monkeypatch.setenv("TGR_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
