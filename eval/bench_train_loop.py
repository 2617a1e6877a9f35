"""Throughput of the real training loop (``zoo.train``), private and not, before and after a code change.

For each release candidate it runs ``zoo.train`` for ``--steps`` steps on the real data set (Poisson sampling,
augmentation views, per-sample gradients, clipping, noise, EMA: everything but the final evaluation, which
``train_time_s`` excludes) and reports samples per second of the loop (K=1; the expected batch B times the steps, over the loop's wall
time, the same count for every variant). Beside it, a non-private loop of
the same model on the same batches: forward, mean of the task's loss, backward, SGD step. Then the same DP loop
at other physical batch sizes. With ``--before REV`` the DP loop is also timed on the code of git revision REV
(checked out into a temporary worktree and run in a subprocess), so the table shows before/after in one run.
Models with a fixed front end (the ScatterNets) run their seeded steps once untimed first, so that the loop is
timed as the releases run it: with each image's scattering computed once (``zoo.nn.layers.memoized_fixed_layers``).
With ``--procs``, the DP loop at the largest physical batch is also timed in fresh processes that each use one
thread (``OMP_NUM_THREADS=1``): one process alone, and ``--procs`` processes that train the one model together
under ``torchrun`` (:mod:`zoo.dp.distributed`: the same batches, clipping and noise as one process, the physical
batches dealt round-robin). The last column compares that with the one process on every thread (torch's default),
the way all earlier releases trained. Run it on an idle machine (it prints the load average at the start and the
end). Reproduce:
    python eval/bench_train_loop.py --before 0c6891a            # about 6 minutes on 2 CPU cores
    python eval/bench_train_loop.py --before b8134cd --steps 6  # the ScatterNet step (about 12 minutes)
    python eval/bench_train_loop.py --before e4070ad --steps 6 --models wrn16-1 wrn16-1-pneumonia eq-resnet9-c4
    python eval/bench_train_loop.py --steps 6 --procs 2 --physical 64 256   # one thread per process, 2 processes
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = [  # (model, dataset, batch size): the release candidates of issue 15
    ("wrn16-1", "cifar10", 256),
    ("wrn16-1-pneumonia", "pneumoniamnist", 256),
    ("eq-resnet9-c4", "cifar10", 128),
    ("scatternet-cnn", "cifar10", 1024),
    ("scatternet-linear", "cifar10", 1024),
]
# models with a fixed front end (a ScatterNet's scattering): the training loop computes it once per image
# (zoo.nn.layers.memoized_fixed_layers), so a short benchmark first runs the same seeded steps once untimed, and then
# times the loop the releases spend their time in
WARM = ("scatternet",)
ROOT = Path(__file__).resolve().parent.parent


def dp_loop(model: str, dataset: str, batch: int, steps: int, physical: int, data_dir) -> float:
    """Samples x views per second of ``zoo.train``'s loop (seeded, so every variant sees the same batches)."""
    import zoo
    from zoo.nn.layers import MEMO_BYTES, memoized_fixed_layers

    kw = dict(dataset=dataset, seed=0, steps=steps, batch_size=batch, physical_batch_size=physical, augmult=1,
              epsilon=8.0, delta=1e-5 if dataset == "cifar10" else 1e-4, data_dir=data_dir, test_subset=10,
              progress=False)
    with memoized_fixed_layers(MEMO_BYTES):
        if model.startswith(WARM):
            zoo.train(model, **kw)
        r = zoo.train(model, **kw)
    return batch * steps / r["test"]["train_time_s"]  # expected samples, as for the revision before


def nonprivate_loop(model: str, dataset: str, batch: int, steps: int, data_dir) -> float:
    """Samples per second of a plain SGD loop on the batches ``zoo.train`` draws (same sampler and generators)."""
    import torch

    import zoo
    from zoo.data import get_dataset_info
    from zoo.dp.step import poisson_batch, step_generator
    from zoo.nn.layers import MEMO_BYTES, memoized_fixed_layers
    from zoo.data.tasks import task_of

    info = get_dataset_info(dataset)
    net = zoo.create_model(model, num_classes=info.num_classes, in_chans=info.in_chans)
    train = info.load("train", data_dir=data_dir)
    task, opt, n = task_of(info), torch.optim.SGD(net.parameters(), lr=0.1), len(train)
    net.train()

    def loop() -> float:
        seen, t0 = 0, time.perf_counter()
        for step in range(steps):
            idx = poisson_batch(n, batch / n, step_generator(0, step, "sample", torch.device("cpu")))
            x, y = train.batch(idx)
            task.loss(net(x), y).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(idx)
        return seen / (time.perf_counter() - t0)

    with memoized_fixed_layers(MEMO_BYTES):  # the same memo of a fixed front end as the DP loop
        if model.startswith(WARM):
            loop()
        return loop()


def _before(rev: str, jobs: list[tuple], steps: int, data_dir) -> dict:
    """The DP loop of each job on the code of ``rev`` (a temporary git worktree, a subprocess)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            code = ("import json, sys, time, zoo\n"
                    "from zoo.nn.layers import MEMO_BYTES, memoized_fixed_layers\n"
                    "out = {}\n"
                    "for m, d, b, p in json.loads(sys.argv[1]):\n"
                    "    kw = dict(dataset=d, seed=0, steps=int(sys.argv[2]), batch_size=b,\n"
                    "              physical_batch_size=p, augmult=1, epsilon=8.0,\n"
                    "              delta=1e-5 if d == 'cifar10' else 1e-4, data_dir=sys.argv[3] or None,\n"
                    "              test_subset=10, progress=False)\n"
                    "    with memoized_fixed_layers(MEMO_BYTES):\n"
                    f"        if m.startswith({WARM!r}):\n"
                    "            zoo.train(m, **kw)\n"
                    "        r = zoo.train(m, **kw)\n"
                    "    out[f'{m}|{p}'] = b * int(sys.argv[2]) / r['test']['train_time_s']\n"
                    "print(json.dumps(out))\n")
            env = {**os.environ, "PYTHONPATH": str(tree), "ZOO_CARDS": ""}
            p = subprocess.run([sys.executable, "-c", code, json.dumps(jobs), str(steps), str(data_dir or "")],
                               cwd=tree, env=env, capture_output=True, text=True, check=True)
            return json.loads(p.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def _worker(job: str) -> int:
    """One process of the ``--procs`` timings: :func:`dp_loop` of the JSON job ``[model, dataset, batch, steps,
    physical, data_dir]``, inside the torchrun process group when there is one (both ``zoo.train`` calls of a
    warm-up share it); rank 0 prints the rate as JSON."""
    from zoo.dp import distributed
    model, dataset, batch, steps, physical, data_dir = json.loads(job)
    with distributed.process_group(None):
        rate = dp_loop(model, dataset, batch, steps, physical, data_dir)
        if distributed.is_main():
            print(json.dumps({"rate": rate}), flush=True)
    return 0


def in_processes(procs: int, model: str, dataset: str, batch: int, steps: int, physical: int, data_dir) -> float:
    """Samples per second of the DP loop in ``procs`` fresh processes of one thread each (torchrun for more than
    one; they train one model together)."""
    job = json.dumps([model, dataset, batch, steps, physical, data_dir])
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
              if procs > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*launch, str(Path(__file__).resolve()), "--worker", job], env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the {procs}-process timing of {model} failed:\n{p.stdout[-2000:]}{p.stderr[-4000:]}")
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])["rate"]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return _worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--before", help="git revision whose DP loop to time too (e.g. 0c6891a)")
    ap.add_argument("--physical", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--data-dir", default=os.environ.get("ZOO_DATA"))
    ap.add_argument("--json")
    ap.add_argument("--models", nargs="+", choices=[c[0] for c in CANDIDATES], help="a subset of the candidates")
    ap.add_argument("--procs", type=int, help="also time the DP loop in 1 and in PROCS one-thread processes")
    args = ap.parse_args()
    import torch

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}",
          flush=True)
    rows = []
    for model, dataset, batch in CANDIDATES:
        if args.models and model not in args.models:
            continue
        print(f"  {model} on {dataset} ...", file=sys.stderr, flush=True)
        dp = {p: dp_loop(model, dataset, batch, args.steps, p, args.data_dir) for p in args.physical if p <= batch}
        plain = nonprivate_loop(model, dataset, batch, args.steps, args.data_dir)
        rows.append({"model": model, "dataset": dataset, "batch": batch, "nonprivate": plain, "dp": dp})
        if args.procs:
            p = max(dp)
            rows[-1]["one_thread"] = in_processes(1, model, dataset, batch, args.steps, p, args.data_dir)
            rows[-1]["procs"] = in_processes(args.procs, model, dataset, batch, args.steps, p, args.data_dir)
    if args.before:
        jobs = [(r["model"], r["dataset"], r["batch"], max(r["dp"])) for r in rows]
        before = _before(args.before, jobs, args.steps, args.data_dir)
        for r in rows:
            r["before"] = before.get(f"{r['model']}|{max(r['dp'])}")
    head = ["model", "data", "B", "non-private /s", *[f"DP phys {p} /s" for p in args.physical],
            "DP / non-private", *(["DP before /s", "after / before"] if args.before else []),
            *(["DP 1 thread /s", f"DP {args.procs} procs x 1 thread /s",
               f"{args.procs} procs / 1 proc x {torch.get_num_threads()} threads"] if args.procs else [])]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        best = r["dp"][max(r["dp"])]  # the largest physical batch timed, as for the revision before
        cells = [r["model"], r["dataset"], str(r["batch"]), f"{r['nonprivate']:.0f}",
                 *[f"{r['dp'][p]:.0f}" if p in r["dp"] else "—" for p in args.physical],
                 f"{r['nonprivate'] / best:.2f}x slower"]
        if args.before:
            cells += [f"{r['before']:.0f}", f"{best / r['before']:.2f}x"]
        if args.procs:
            cells += [f"{r['one_thread']:.0f}", f"{r['procs']:.0f}", f"{r['procs'] / best:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    print(f"# load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
