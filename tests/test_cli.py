"""The `tgr` command: the smoke preset end to end, kill-and-resume equality, and bad inputs that must fail
clearly without touching an existing run."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

from tgr.cli import main
from tgr.runs import PRESETS, resolve_config

CLI = [sys.executable, "-c", "from tgr.cli import main; main()"]
# 30 short epochs so that a kill lands in the middle of meta-training; checkpoints every 3 epochs
KILL_ARGS = ["run", "--preset", "smoke", "epochs=30", "ckpt_every=3", "eval_every=5"]


def _tgr(capsys, *argv) -> tuple[int, str, str]:
    "Run `tgr argv` in this process; (exit code, stdout, stderr)."
    code = 0
    try: main(list(argv))
    except SystemExit as e: code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _metrics(d: Path) -> list[dict]:
    "The run's metrics.jsonl without its timings and memory readings."
    return [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "peak_rss_mb")} for l in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    "A finished smoke run (subprocess, as a user runs it)."
    d = tmp_path_factory.mktemp("smoke") / "run"
    r = subprocess.run(CLI + ["run", "--preset", "smoke", "--out", str(d)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r.stdout


def test_smoke_end_to_end(smoke_run):
    d, stdout = smoke_run
    res = json.loads((d / "results.json").read_text())
    assert set(res["methods"]) == {"tgr", "finetune", "best_model", "average"}
    for m in res["methods"].values():
        assert set(m) == {"5w1s", "5w5s"}
        for row in m.values():
            assert row["n_tasks"] == PRESETS["smoke"].n_test_tasks and 0 <= row["acc"] <= 100 and row["ci95"] > 0
    assert res["config"]["epochs"] == PRESETS["smoke"].epochs and res["git_commit"]
    assert {"pool", "recover", "align", "meta_test", "baselines"} <= set(res["timings"])
    metrics = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == list(range(1, PRESETS["smoke"].epochs + 1))
    assert all("gradient_variance" in r and "gradient_cosine" in r for r in metrics)
    assert (d / "config.json").exists() and (d / "checkpoint.pt").exists()
    assert "tgr" in stdout and "± " in stdout                      # the table was printed


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = subprocess.run(CLI + KILL_ARGS + ["--out", str(full)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # start the same run and SIGKILL it once it has logged 10 epochs (between checkpoints 9 and 12)
    p = subprocess.Popen(CLI + KILL_ARGS + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10: break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed; raise epochs in KILL_ARGS"
    assert not (killed / "results.json").exists()
    r = subprocess.run(CLI + KILL_ARGS + ["--out", str(killed), "--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, killed))
    assert a["methods"] == b["methods"] and a["selection"] == b["selection"]
    assert _metrics(full) == _metrics(killed)


def test_fresh_processes_with_empty_caches_agree(tmp_path):
    """The same seed gives the same run in two fresh processes, each building its pool, tasks and groups from an empty
    cache, with different hash seeds and the machine's thread count (recovery runs members side by side)."""
    runs = []
    for k in (1, 2):
        env = {**os.environ, "TGR_CACHE": str(tmp_path / f"cache{k}"), "PYTHONHASHSEED": str(k)}
        r = subprocess.run(CLI + ["run", "--preset", "smoke", "--out", str(tmp_path / f"run{k}")], capture_output=True, text=True,
                           timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(tmp_path / f"run{k}")
    a, b = (json.loads((d / "results.json").read_text()) for d in runs)
    assert a["methods"] == b["methods"] and a["selection"] == b["selection"] and a["groups"] == b["groups"]
    assert a["checksums"] == b["checksums"]
    assert _metrics(runs[0]) == _metrics(runs[1])


def test_help_explains_presets_and_fields(capsys):
    code, out, _ = _tgr(capsys, "run", "--help")
    assert code == 0
    for name in PRESETS: assert name in out
    assert "field=value" in out and "--resume" in out
    code, out, _ = _tgr(capsys, "presets")
    assert code == 0 and "inv_steps=" in out and "smoke" in out
    assert 'replay_source="within"' in out.split("quick", 1)[1].split("paper-cifar-fs")[0]   # what each preset sets
    code, top, _ = _tgr(capsys, "--help")
    assert code == 0 and top != _tgr(capsys, "run", "--help")[1] and "tgr test" in top and "tgr split" in top
    code, out, _ = _tgr(capsys, "--version")
    assert code == 0 and out.startswith("tgr ")


@pytest.mark.parametrize("args, message", [
    (["run", "--preset", "nope"], "unknown preset"),
    (["run", "--preset", "smoke", "n_model=3"], "unknown config field"),
    (["run", "--preset", "smoke", "seed=abc"], "expected a int"),
    (["run", "--preset", "smoke", "grouping=clusters"], "grouping must be one of"),
    (["run", "--preset", "smoke", "n_groups=many"], "positive integer or 'auto'"),
    (["run", "--preset", "smoke", "n_groups=0"], "positive integer or 'auto'"),
    (["run", "--preset", "smoke", "--sed", "1"], "unknown option"),
    (["run", "--preset", "smoke", "--resume", "--overwrite"], "exclude each other"),
    (["run", "--preset", "paper-cifar-fs"], "root"),                   # no data root given
    (["run", "--preset", "smoke", "way=40"], "lower `way`"),           # the glyph test split has 32 classes
    (["run", "--preset", "smoke", "shots=[200]"], "lower `way`, `shot` or `query`"),  # 100 images per class
    (["run", "--preset", "smoke", "beta=NaN"], "beta must be a finite number"),
    (["run", "--preset", "smoke", "inner_lr=0"], "inner_lr must be a finite number > 0"),   # the field is named
    (["run", "--preset", "smoke", "--resume"], "holds no run"),       # nothing to resume: said at once
])
def test_bad_inputs_fail_clearly_and_write_nothing(capsys, tmp_path, args, message):
    out = tmp_path / "run"
    code, _, err = _tgr(capsys, *args, "--out", str(out))
    assert code == 2 and message in err, err
    assert err.startswith("tgr: error:") and "Traceback" not in err
    assert not out.exists(), "a failed start must not create the run directory"


def test_n_groups_takes_auto():
    "n_groups is the one field that takes a number or the word auto (Calinski-Harabasz, notebook 06)."
    assert resolve_config("smoke", ["n_groups=auto"]).check().n_groups == "auto"
    assert resolve_config("smoke", ["n_groups=4"]).check().n_groups == 4


def test_existing_run_is_never_overwritten(capsys, smoke_run, tmp_path):
    d = tmp_path / "run"; shutil.copytree(smoke_run[0], d)
    before = _snapshot(d)
    code, _, err = _tgr(capsys, "run", "--preset", "smoke", "seed=1", "--out", str(d))
    assert code == 2 and "different config" in err
    code, _, err = _tgr(capsys, "run", "--preset", "smoke", "--out", str(d))
    assert code == 2 and "--resume" in err
    assert _snapshot(d) == before


def test_corrupt_checkpoint_is_refused(capsys, smoke_run, tmp_path):
    d = tmp_path / "run"; shutil.copytree(smoke_run[0], d)
    ck = d / "checkpoint.pt"; ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])   # a torn write
    before = _snapshot(d)
    code, _, err = _tgr(capsys, "run", "--preset", "smoke", "--resume", "--out", str(d))
    assert code == 2 and "checkpoint.pt" in err, err
    assert _snapshot(d) == before


def test_method_free_end_to_end(tmp_path):
    "`--method free`: meta-generator recovery, BELL, no grouping; results.json carries a `free` entry."
    d = tmp_path / "free"
    r = subprocess.run(CLI + ["run", "--preset", "smoke", "--method", "free", "--out", str(d), "five_k=2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((d / "results.json").read_text())
    assert "free" in res["methods"] and "tgr" not in res["methods"]
    assert res["config"]["recovery"] == "meta-generator" and res["config"]["alignment"] == "bell"
    assert res["config"]["grouping"] == "none" and set(res["methods"]["free"]) == {"5w1s", "5w5s"}
