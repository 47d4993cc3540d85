import os, pytest

@pytest.fixture(autouse=True, scope="session")
def _quiet_progress():
    "Progress bars off in tests (the glyph benchmark and pools stay in the user cache between runs)."
    os.environ.setdefault("TGR_PROGRESS", "0")
    yield
