"""Start-up cost of zoo models: ``import zoo`` and ``zoo.create_model(name)`` in fresh processes.

For each model (default: every registered ``eq-*`` model) it runs two fresh Python processes with the same
``ZOO_CACHE`` (a new empty directory per model unless ``--cache`` is given):
  cold: the cache is empty, so escnn's He-initialisation variances are computed (and stored);
  warm: the cache is filled, which is what every later build sees.
It reports the time of ``import zoo`` and of the build (which includes importing escnn) in each. escnn's own
joblib cache (irrep restrictions, in escnn's install directory) is not cleared: it is filled by the first
escnn use on the machine. ``--cli`` instead times the command line's start-up (``zoo --help``, ``zoo list``,
``import zoo``) against ``import torch`` in fresh processes. Reproduce (2 CPU cores, a few minutes):
    python eval/bench_startup.py [--cli]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import zoo
from zoo.catalog.registry import get_card

PROBE = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
import zoo
t1 = time.perf_counter()
zoo.create_model(sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1}))
"""


def probe(name: str, cache: str) -> dict:
    env = {**os.environ, "ZOO_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", PROBE, name], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


CLI = {"import torch": ["-c", "import torch"], "import zoo": ["-c", "import zoo"],
       "zoo --help": ["-m", "zoo", "--help"], "zoo list": ["-m", "zoo", "list"],
       "zoo list --pretrained": ["-m", "zoo", "list", "--pretrained"],
       "zoo.create_model('wrn16-1')": ["-c", "import zoo; zoo.create_model('wrn16-1')"]}
"""``--cli``: the commands timed in fresh processes (the first two are the references)."""


def cli_table(repeats: int = 5) -> list[dict]:
    """Median wall time of each :data:`CLI` command over ``repeats`` fresh processes, and its ratio to
    ``import torch`` (what every command paid before ``zoo list`` and ``zoo --help`` stopped importing it)."""
    import statistics
    import time

    rows = []
    for what, argv in CLI.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *argv], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        rows.append({"command": what, "median_s": statistics.median(times)})
    ref = rows[0]["median_s"]
    for r in rows:
        r["vs_import_torch"] = r["median_s"] / ref
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cli", action="store_true", help="time the command line's start-up instead (fresh processes: "
                    "import torch, import zoo, zoo --help, zoo list, ...)")
    ap.add_argument("--models", nargs="+", default=["eq-*"], help="shell patterns of model names (default: eq-*)")
    ap.add_argument("--cache", help="ZOO_CACHE to use (default: a new empty temporary directory)")
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.cli:
        rows = cli_table()
        print(f"{os.cpu_count()} CPUs; median of 5 fresh processes each")
        print(f"{'command':<30} {'wall s':>8} {'x import torch':>15}", "-" * 55, sep="\n")
        for r in rows:
            print(f"{r['command']:<30} {r['median_s']:>8.2f} {r['vs_import_torch']:>15.2f}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return 0
    names = sorted({n for pat in args.models for n in zoo.list_models(pat)})
    if not names:
        ap.error(f"no registered model matches {args.models}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-cache-") as tmp:
        cache = args.cache or tmp
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            own = cache if args.cache else os.path.join(tmp, name)  # no model profits from another's entries
            cold, warm = probe(name, own), probe(name, own)
            rows.append({"model": name, "family": get_card(name)["family"], "import_s": warm["import_s"],
                         "cold_build_s": cold["build_s"], "warm_build_s": warm["build_s"]})
    fmt = "{:<22} {:>10} {:>18} {:>18}"
    print(f"ZOO_CACHE: {args.cache or 'a fresh empty directory per model'} | {os.cpu_count()} CPUs")
    print(fmt.format("model", "import s", "first build s", "cached build s"), "-" * 71, sep="\n")
    for r in rows:
        print(fmt.format(r["model"], f"{r['import_s']:.2f}", f"{r['cold_build_s']:.2f}", f"{r['warm_build_s']:.2f}"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
