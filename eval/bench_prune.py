"""DP-SGD step time of a pruned L0 network against the gated network it came from and its dense twin.

For each sparse model (default: every registered model with ``l0`` gates) the gates are set so that a fraction
``--closed`` of each block's channel gates is shut (the channels with the lowest random ``log_alpha``; in a
trained network the penalty does this), then ``zoo.prune`` builds the smaller network. With ``--runs DIR`` the
models are instead the trained gated networks in the run folders under ``DIR`` (each ``final.safetensors`` whose
sidecar has ``l0``; e.g. ``runs/study-sparsity-budget`` of ``eval/study_sparsity.py``), at their own input size.
The dense twin is the same architecture without gates (``l0=False``): what the pruned network must beat. All
three take a DP step (``zoo.dp.step.dp_gradients`` + SGD, one physical batch) on the same random batch,
interleaved, ``--repeats`` rounds after a warm-up; medians are reported, and the ratio pruned / dense.
Reproduce (2 CPU cores, about a minute each):
    python eval/bench_prune.py --closed 0.5 --batch-size 64 --repeats 3
    python eval/bench_prune.py --runs runs/study-sparsity-budget --batch-size 128 --repeats 5 \\
        --markdown eval/results/bench-prune/results.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import zoo
from _timing import timer
from zoo.dp.step import dp_gradients
from zoo.dp.grad_sample import PerSampleGradients
from zoo.catalog.checkpoint import paths
from zoo.catalog.registry import build, get_card, load_checkpoint
from zoo.nn.sparse import gate_modules


def shut(model: torch.nn.Module, fraction: float, generator: torch.Generator) -> None:
    """Close the ``fraction`` of each channel gate's channels with the lowest random log_alpha; open the rest."""
    with torch.no_grad():
        for m in gate_modules(model):
            la = torch.randn(m.log_alpha.shape, generator=generator)
            k = int(fraction * la.numel()) if la.numel() > 1 else 0
            closed = la.argsort()[:k]
            m.log_alpha.fill_(5.0)
            m.log_alpha[closed] = -5.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["*"])
    ap.add_argument("--closed", type=float, default=0.5, help="fraction of each block's channel gates shut")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=Path, help="time the trained gated networks in the run folders under this one")
    ap.add_argument("--markdown", type=Path, help="also write the table to this results.md (with the command, "
                    "threads, torch version and the load average before and after)")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    if args.runs:
        found = sorted(args.runs.glob("*/final.safetensors"))
        gated = [p for p in found if json.loads(paths(p)[1].read_text())["args"].get("l0")]  # sidecars only
        cases = [(p.parent.name, *load_checkpoint(p)) for p in gated]
        cases = [(n, m, sc["preparation"]["input_size"], sc["card"], sc["args"]) for n, m, sc in cases]
        if not cases:
            ap.error(f"no finished run of a gated network under {args.runs} (looked for */final.safetensors)")
    else:
        names = sorted({n for pat in args.models for n in zoo.list_models(pat) if get_card(n)["args"].get("l0")})
        if not names:
            ap.error(f"no registered L0 model matches {args.models}")
        cases = []
        for name in names:
            torch.manual_seed(0)
            model = zoo.create_model(name)
            shut(model, args.closed, torch.Generator().manual_seed(0))
            cases.append((name, model, get_card(name)["input_size"], get_card(name), {}))
    time_ms = timer(torch.device("cpu"))
    fmt = "{:<44} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}"
    print(f"threads {torch.get_num_threads()} | " + (f"trained gates of {args.runs}" if args.runs else
          f"closed fraction {args.closed}") + f" | batch {args.batch_size} | median of {args.repeats} interleaved "
          f"rounds after 1 warm-up")
    heads = ("model", "params", "pruned", "MFLOPs", "pruned", "dense ms", "gated ms", "pruned ms", "pr./dense")
    print(fmt.format(*heads))
    rows = []
    for name, model, input_size, card, model_args in cases:
        torch.manual_seed(0)
        small, report = zoo.prune(model, input_size=tuple(input_size))
        small.train()
        dense = build(card, **{**model_args, "l0": False}).train()  # the same architecture without gates
        x = torch.randn(args.batch_size, *input_size)
        y = torch.randint(0, model.num_classes, (args.batch_size,))
        steps = {}
        for key, net in (("dense", dense), ("gated", model), ("pruned", small)):
            psg, opt = PerSampleGradients(net), torch.optim.SGD(net.parameters(), lr=0.1)

            def step(psg=psg, opt=opt):
                grads, _, _ = dp_gradients(psg, [(x, y)], clip_norm=1.0, sigma=1.0, expected_batch=args.batch_size,
                                           views=1, noise_generator=torch.Generator().manual_seed(0))
                for n, p in psg.params.items():
                    p.grad = grads[n]
                opt.step()
                opt.zero_grad(set_to_none=True)
            steps[key] = step
        times = {k: [] for k in steps}
        for r in range(args.repeats + 1):
            for k, f in steps.items():
                ms = time_ms(f)
                if r:
                    times[k].append(ms)
        ms = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, f"{report['params_before']:,}", f"{report['params_after']:,}",
                     f"{report['flops_before'] / 1e6:.1f}", f"{report['flops_after'] / 1e6:.1f}",
                     f"{ms['dense']:.1f}", f"{ms['gated']:.1f}", f"{ms['pruned']:.1f}",
                     f"{ms['pruned'] / ms['dense']:.2f}"))
        print(fmt.format(*rows[-1]))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        cmd = "python eval/bench_prune.py " + " ".join(sys.argv[1:])
        lines = ["### DP step time of pruned L0 networks against their dense twins (`bench_prune`)", "",
                 f"`{cmd}`: one DP step (per-sample gradients, clipping, noise, SGD) on one physical batch of "
                 f"{args.batch_size}, median of {args.repeats} interleaved rounds after a warm-up; {platform.machine()}, "
                 f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; load "
                 f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (the benchmark's own load "
                 "included). Dense twin: the same architecture without gates, what the pruned network replaces.", "",
                 "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
