"""The GPU check of `tgr`, one short script for a machine with CUDA (about 3-5 minutes on one GPU, plus step 4's compilation):

1. the smoke preset end to end on CUDA (`tgr run --preset smoke device=cuda`), its wall time and peak GPU memory;
2. CPU and CUDA agree on a meta-test (same model, same seeded episodes) within float tolerance, a replay
   meta-gradient from the CUDA `vmap` path agrees with the CPU loop, and a short task recovery (channels-last
   generator, fused Adam) gives the same losses and images;
3. the units of `tgr bench` timed on CUDA (synchronised), `meta_test` itself included, written with the CPU record format to `--out`;
4. last, whether `torch.compile` pays for meta-testing on CUDA: one `vmap` batch of 8 first-order 5w1s episodes (`meta_test`'s
   CUDA path), eager against compiled, with the compile time (on a 2-core CPU: 170 s to compile, then 231 ms against 597 ms eager).

    python .ci/gpu_check.py --out results/bench_cuda.json

On a machine lent for a few minutes, write the record where the lender returns files from (e.g. `--out $OUT/bench_cuda.json`):
it is written after step 3 and again after step 4, so a run stopped by a time limit still returns steps 1-3.

Exits non-zero, with the reason, if CUDA is missing or a check fails.
"""
import argparse, copy, os, platform, sys, tempfile, time
from dataclasses import replace
from pathlib import Path

import torch


DEV = "cuda"                                   # --device cpu runs the same checks on the CPU, to try the script without a GPU

def sync():
    if DEV == "cuda": torch.cuda.synchronize()

def smoke_on_cuda(workdir: Path) -> dict:
    from tgr.runs import resolve_config, run
    cfg = replace(resolve_config("smoke"), device=DEV)
    if DEV == "cuda": torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = run(cfg, out=workdir/"smoke", show_progress=False)
    peak = round(torch.cuda.max_memory_allocated() / 2**20) if DEV == "cuda" else None
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_gpu_mb": peak, "methods": res["methods"]}


def cpu_cuda_agree() -> dict:
    from tgr.bench import _episode_data
    from tgr.data import FewShotDataset
    from tgr.evaluate import meta_test
    from tgr.models import build_model
    from tgr.replay import maml_backward
    torch.manual_seed(0); model = build_model("conv4", 5, 32)
    ds = FewShotDataset(torch.arange(10).repeat_interleave(20), [str(c) for c in range(10)], ["random"] * 10,
                        images=torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    a = meta_test(model, ds, 5, 1, n_tasks=32, device="cpu", show_progress=False)
    b = meta_test(model, ds, 5, 1, n_tasks=32, device=DEV, show_progress=False)
    assert a.episodes == b.episodes, "CPU and CUDA drew different episodes"
    per_task = max(abs(x - y) for x, y in zip(a.accs, b.accs))
    tasks = [_episode_data(1, seed=i) for i in range(4)]
    grads = {}
    for dev in ("cpu", DEV):
        m = build_model("conv4", 5, 32); m.load_state_dict(model.state_dict()); m.to(dev)
        maml_backward(m, [tuple(z.to(dev) for z in t) for t in tasks])
        grads[dev] = torch.cat([p.grad.flatten().cpu() for p in m.parameters()])
    rel = float((grads["cpu"] - grads[DEV]).norm() / grads["cpu"].norm())
    out = {"meta_test_acc_cpu": a.acc, "meta_test_acc_cuda": b.acc, "largest_per_episode_difference": per_task,
           "replay_meta_gradient_relative_difference": rel}
    # one flipped query of 75 = 1.33 points: float32 rounding after 10 steps flips a few; more, or a mean off by a point, is a bug
    assert abs(a.acc - b.acc) < 1.0 and per_task <= 4.0, out
    assert rel < 5e-2, out
    return out


def recovery_agree() -> dict:
    "Three Adam steps of task recovery (Table 7 generator, untrained Conv4 teacher) on CPU and on the device: same losses and images."
    from tgr.inversion import recover_task
    from tgr.models import build_model
    torch.manual_seed(0); teacher = build_model("conv4", 5, 32).eval()
    runs = {dev: recover_task(copy.deepcopy(teacher).to(dev), 5, per_class=4, steps=3, ngf=32, device=dev) for dev in ("cpu", DEV)}
    a, b = runs["cpu"], runs[DEV]
    out = {"recovery_loss_relative_difference": max(abs(x - y) / abs(x) for x, y in zip(a.losses["total"], b.losses["total"])),
           "recovery_image_max_difference": float((a.x - b.x).abs().max()), "best_steps": [a.best_step, b.best_step]}
    assert out["recovery_loss_relative_difference"] < 1e-3 and out["recovery_image_max_difference"] < 1e-2, out
    return out


def units_on_cuda() -> dict:
    from tgr.bench import episode_unit, plain_episode, meta_test_unit, replay_unit, generator_unit, count_flops, time_unit
    rows = {}
    units = {"meta-test episode 5w1s (tgr)": episode_unit(1, device=DEV), "meta-test episode 5w1s (plain PyTorch)": plain_episode(1, device=DEV),
             "meta_test, 16 episodes 5w1s": meta_test_unit(1, device=DEV), "meta_test, 16 episodes 5w5s": meta_test_unit(5, device=DEV),
             "replay, 4 tasks 5w1s (second order, 5 steps; vmap on CUDA)": replay_unit(device=DEV),
             "generator step, 30 images (tgr)": generator_unit(6, device=DEV),
             "generator step, 30 images (reference formulation)": generator_unit(6, authors=True, device=DEV),
             "generator step, 30 images (tgr, precision='bf16')": generator_unit(6, device=DEV, precision="bf16"),
             "generator step, 150 images (tgr, the paper's 30 per class)": generator_unit(30, device=DEV),
             "generator step, 150 images (tgr, precision='bf16')": generator_unit(30, device=DEV, precision="bf16")}
    for name, fn in units.items():
        t = time_unit(lambda: (fn(), sync()), reps=10); fl = count_flops(fn)   # synchronised: the device's time
        rows[name] = {**t, "gflop": fl / 1e9, "gflop_per_s": fl / 1e9 / t["median_s"]}
    return rows


def compiled_meta_test(n_episodes: int = 8) -> dict:
    "Eager against `torch.compile`d: one vmap batch of first-order 5w1s episodes as `meta_test` runs them on CUDA. Never raises."
    from torch.func import vmap
    from tgr.bench import _episode_data, _scored_conv4, time_unit
    from tgr.replay import MetaForward, adapt
    model = _scored_conv4(DEV); f = MetaForward(model); p0 = {k: p.detach() for k, p in model.named_parameters()}
    xs, ys, xq, yq = (torch.stack(z) for z in zip(*[_episode_data(1, seed=i, device=DEV) for i in range(n_episodes)]))
    def run_task(xs, ys, xq, yq):
        return (f(adapt(f, p0, xs, ys, 10, 0.01, first_order=True), xq).argmax(-1) == yq).sum()
    eager, out = vmap(run_task), {"episodes_per_batch": n_episodes}
    try:
        compiled = torch.compile(eager)
        t0 = time.perf_counter(); c = compiled(xs, ys, xq, yq); sync(); out["compile_s"] = round(time.perf_counter() - t0, 1)
        out["largest_correct_difference"] = int((c - eager(xs, ys, xq, yq)).abs().max())     # of 75 queries: a flip is rounding
        for name, fn in (("eager", eager), ("compiled", compiled)):
            out[f"{name}_ms_per_batch"] = round(1000 * time_unit(lambda: (fn(xs, ys, xq, yq), sync()), reps=10)["median_s"], 2)
    except Exception as e:                      # a missing compiler or an unsupported op is a finding, not a failed check
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench_cuda.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: try the script's plumbing without a GPU")
    ap.add_argument("--skip-compile", action="store_true", help="leave out step 4 (minutes of compilation)")
    a = ap.parse_args()
    global DEV; DEV = a.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # float32 on both sides of the comparison
    if DEV == "cuda" and not torch.cuda.is_available(): sys.exit("no CUDA device: run this script on a machine with a GPU")
    from tgr.core import git_commit, save_json
    rec = {"machine": torch.cuda.get_device_name(0) if DEV == "cuda" else platform.processor(), "host": platform.node(), "torch": torch.__version__, "device": DEV,
           "commit": git_commit(), "cuda": torch.version.cuda}
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("TGR_CACHE", str(Path(d)/"cache"))
        t0 = time.perf_counter(); rec["agreement"] = {**cpu_cuda_agree(), **recovery_agree()}; print(f"CPU/{DEV} agreement:", rec["agreement"], flush=True)
        rec["units"] = units_on_cuda()
        for k, v in rec["units"].items(): print(f"{k:60s} {1000 * v['median_s']:8.2f} ms {v['gflop_per_s']:8.1f} GFLOP/s", flush=True)
        rec["smoke"] = smoke_on_cuda(Path(d)); print(f"smoke preset on {DEV}:", rec["smoke"], flush=True)
        rec["check_seconds"] = round(time.perf_counter() - t0, 1)
        save_json(rec, a.out); print("wrote", a.out, flush=True)
        if not a.skip_compile:
            rec["compile"] = compiled_meta_test(); print("torch.compile of meta-testing:", rec["compile"], flush=True)
            save_json(rec, a.out); print("wrote", a.out)


if __name__ == "__main__":
    main()
