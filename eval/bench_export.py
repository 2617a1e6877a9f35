"""Inference with ``zoo.export(model)`` against the equivariant model it came from, for equivariant zoo models.

For each model (default: every registered ``eq-*`` model), on a random batch in eval mode without autograd, it
reports the median wall time over ``--repeats`` interleaved rounds (after one warm-up round) of:
  (a) the equivariant model: escnn's basis expansion rebuilds every filter in every forward pass;
  (b) the exported model: ``nn.Conv2d`` / ``nn.GroupNorm`` (and zoo's plain-torch FieldNorm when used) holding the
      expanded filters, i.e. a plain CNN with the equivariant model's channel counts;
and the largest absolute difference of their logits. Also the time to export. Progress on stderr, table on
stdout. Reproduce (2 CPU cores, a few minutes):
    python eval/bench_export.py --batch-sizes 1 256 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import zoo
from _timing import timer
from zoo.catalog.registry import get_card


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["eq-*"], help="shell patterns of model names (default: eq-*)")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = ap.parse_args()
    names = sorted({n for pat in args.models for n in zoo.list_models(pat)
                    if get_card(n)["family"].startswith("eq-")})
    if not names:
        ap.error(f"no registered equivariant model matches {args.models}")
    device = torch.device(args.device)
    time_ms = timer(device)

    header = (f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads()} | load avg "
              f"{os.getloadavg()[0]:.2f} | median of {args.repeats} interleaved rounds after 1 warm-up")
    print(header, file=sys.stderr, flush=True)
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        model = zoo.create_model(name).to(device).eval()
        t0 = time.perf_counter()
        plain = zoo.export(model)
        export_s = time.perf_counter() - t0
        card = get_card(name)
        for b in args.batch_sizes:
            x = torch.randn(b, *card["input_size"], device=device)
            variants = {"eq": lambda: model(x), "exported": lambda: plain(x)}
            times = {k: [] for k in variants}
            with torch.no_grad():
                diff = (model(x) - plain(x)).abs().max().item()
                for r in range(args.repeats + 1):
                    for k, f in variants.items():
                        ms = time_ms(f)
                        if r:
                            times[k].append(ms)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"model": name, "batch": b, "eq_ms": med["eq"], "exported_ms": med["exported"],
                         "speedup": med["eq"] / med["exported"], "max_abs_diff": diff, "export_s": export_s})
            print("    B={batch}: eq {eq_ms:.1f} ms, exported {exported_ms:.1f} ms".format(**rows[-1]),
                  file=sys.stderr, flush=True)
    fmt = "{:<20} {:>6} {:>10} {:>13} {:>12} {:>13} {:>10}"
    print(header, fmt.format("model", "batch", "eq ms", "exported ms", "eq/exported", "max |diff|", "export s"),
          "-" * 90, sep="\n")
    for r in rows:
        print(fmt.format(r["model"], r["batch"], f"{r['eq_ms']:.1f}", f"{r['exported_ms']:.1f}",
                         f"{r['speedup']:.2f}", f"{r['max_abs_diff']:.1e}", f"{r['export_s']:.2f}"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "args": vars(args), "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
