"The repository's promises: README set-up commands, CI running the same test command, docs sidebar order."
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [l.split("#")[0].strip() for l in block.strip().splitlines()]


def test_readme_opens_with_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0].startswith("pip install -e . && tgr run --preset quick")
    assert "nbdev_test" in cmds[1] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r"TEST_CMD='(.*)'", ci).group(1)
    assert test_cmd == readme_commands()[1]


def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "make_readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_links_point_at_files():
    links = re.findall(r"\]\((?!https?:|#)([^)\s]+)\)", (ROOT / "README.md").read_text())
    assert links, "the README links the notebooks"
    missing = [l for l in links if not (ROOT / l.split("#")[0]).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_sidebar_lists_notebooks_in_reading_order():
    listed = re.findall(r"^\s*-\s*(\S+\.ipynb)", (ROOT / "nbs" / "sidebar.yml").read_text(), re.M)
    numbered = sorted(p.name for p in (ROOT / "nbs").glob("[0-9][0-9]*.ipynb"))
    assert listed == ["index.ipynb"] + numbered


def test_settings_flags_and_pins():
    ini = (ROOT / "settings.ini").read_text()
    assert re.search(r"^tst_flags = slow gpu$", ini, re.M) and re.search(r"^cell_number = False$", ini, re.M)
    assert "nbdev>=2.4.5,<3" in ini and "fastcore>=1.8,<1.9" in ini and "console_scripts = tgr=tgr.cli:main" in ini
