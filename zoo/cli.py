"""The ``zoo`` command line: list, info, train, finetune, eval, segment, publish, reproduce, card."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoo.catalog.cards import CARDS_DIR
from zoo.io import PATH_FORMS
from zoo.render import MODEL_CARD_PATH, render_model_card
from zoo.reproduce import EVAL_TOLERANCE, RETRAIN_TOLERANCE  # constants: zoo.reproduce imports torch lazily
from zoo.runspec import RunSpec, add_training_commands, run

# torch, opacus and escnn are imported by the commands that need them, so that `zoo --help` and `zoo list` read the
# cards alone (a test checks that they import none of them)


def _report(result: dict) -> None:
    led, test = result["ledger"], result["test"]
    metric = (f"test accuracy {test['accuracy']:.4f} (balanced {test['balanced_accuracy']:.4f}, "
              f"ROC-AUC {test['roc_auc']:.4f})" if "accuracy" in test
              else f"test Dice {test['dice']:.4f}, IoU {test['iou']:.4f} (foreground)")
    print(f"{result['model']} on {result['dataset']}: {metric} "
          f"({test['num_samples']} images) at epsilon={led['epsilon']:.3f}, delta={led['delta']:g} "
          f"({led['accountant'].upper()}, sigma={result['noise_multiplier']:.3f}, q={result['sample_rate']:.4g}, "
          f"{led['steps']} steps); train time {test['train_time_s']} s")
    _say_honestly(test)
    if "checkpoint" in result:
        print(f"checkpoint: {result['checkpoint']} (result: {Path(result['checkpoint']).parent / 'result.json'})")


def _say_honestly(test: dict) -> None:
    """The majority-class baseline beside a classifier's scores, and any warning about them, in words."""
    base = test.get("baseline")
    if base:
        print(f"majority-class baseline ({base['rule']}): accuracy {base['accuracy']:.4f}, balanced accuracy "
              f"{base['balanced_accuracy']:.4f}, ROC-AUC {base['roc_auc']:.1f}")
    for w in test.get("warnings", ()):
        print(f"WARNING: {w}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `zoo` command; its `train` and `finetune` are :mod:`zoo.runspec`'s (which `zoo reproduce`
    also reads recorded commands with)."""
    parser = argparse.ArgumentParser(prog="zoo", description="DP-SGD model zoo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--pretrained", action="store_true")
    p = sub.add_parser("info", help="show a model's card, parameter count and checkpoint status")
    p.add_argument("name")
    add_training_commands(sub)  # train, finetune (zoo.runspec)
    p = sub.add_parser("eval", help="evaluate a pretrained model or a checkpoint on its test set")
    p.add_argument("name")
    p.add_argument("--dataset", help=f"evaluate on this registered data set or path instead of the checkpoint's "
                                     f"own (a path: {PATH_FORMS})")
    p.add_argument("--data-dir")
    p.add_argument("--device")
    p.add_argument("--test-subset", type=int)
    p.add_argument("--out", help="JSON result file (default: runs/eval/<model>.json)")
    p = sub.add_parser("segment", help="masks for your own images of any size from a segmentation checkpoint")
    p.add_argument("name", help="NAME.TAG of a published segmentation checkpoint, or a run's checkpoint file")
    p.add_argument("images", nargs="+", help="8-bit image files (PNG, JPEG, TIFF, ...)")
    p.add_argument("--out", default="runs/masks", help="folder of the masks (default runs/masks): IMAGE-mask.png, "
                                                        "class k written as k * 255 // (classes - 1)")
    p.add_argument("--tile", type=int, help="largest window segmented in one pass (default: the training size)")
    p.add_argument("--overlap", type=float, default=0.25, help="overlap of neighbouring windows (default 0.25)")
    p = sub.add_parser("publish", help="publish a finished run (secret seed) as a card's checkpoint NAME.TAG")
    p.add_argument("run", help="the run folder (holds final.safetensors/.json)")
    p.add_argument("name", help="the card to publish it under")
    p.add_argument("--tag", required=True, help="e.g. dp_eps8 (the checkpoint is then NAME.TAG)")
    p.add_argument("--default", action="store_true", help="make it the card's default checkpoint")
    p.add_argument("--note", default="", help="added to the note of each card result")
    p.add_argument("--data-dir")
    p = sub.add_parser("card", help=f"regenerate {MODEL_CARD_PATH.name} from {CARDS_DIR.name}/*.json")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale instead of writing it")
    p = sub.add_parser("reproduce", help="check a card's reported numbers against its checkpoint (or a rerun)")
    p.add_argument("name")
    p.add_argument("--retrain", action="store_true",
                   help="rerun the recorded command of each reported result (zoo train/finetune) and compare")
    p.add_argument("--tolerance", type=float,
                   help=f"largest allowed |measured - reported| (absolute; default {EVAL_TOLERANCE} for the "
                        f"checkpoint, {RETRAIN_TOLERANCE} with --retrain: see zoo.reproduce)")
    p.add_argument("--data-dir")
    p.add_argument("--device")
    p.add_argument("--test-subset", type=int, help="evaluate on this subset (default: the one the result's "
                                                    "command used, else the full test set)")
    p.add_argument("--epsilon", type=float, help="with --retrain: only the results at this epsilon")
    p.add_argument("--out", help="with --retrain: folder of the reruns (default runs/reproduce/<name>)")
    p.add_argument("--report", help="also write the checks as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)

    import zoo

    try:
        if a.cmd == "list":
            names = zoo.list_models(a.pattern, pretrained=a.pretrained)
            for name in names:
                print(name)
            if not names:
                what = "published checkpoint" if a.pretrained else "registered model"
                print(f"no {what} matches {a.pattern!r}" + (
                    "; `zoo list` shows every registered model" if a.pretrained else ""), file=sys.stderr)
        elif a.cmd == "info":
            print(json.dumps(zoo.model_info(a.name), indent=2, ensure_ascii=False))
        elif a.cmd in ("train", "finetune"):
            from zoo.dp import distributed
            result = run(RunSpec.from_args(a))
            if distributed.is_main():  # under torchrun, rank 0 reports
                _report(result)
        elif a.cmd == "eval":
            result = _evaluate(a)
            out = Path(a.out or Path("runs") / "eval" / f"{result['model']}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=2))
            for w in result["test"].get("warnings", ()):
                print(f"WARNING: {w}", file=sys.stderr)
        elif a.cmd == "segment":
            _segment(a)
        elif a.cmd == "reproduce":
            return _reproduce(a)
        elif a.cmd == "card":
            return _card(a.check)
        elif a.cmd == "publish":
            from zoo.publish import publish

            print(json.dumps(publish(a.run, a.name, a.tag, default=a.default, data_dir=a.data_dir, note=a.note),
                             indent=2))
    except (KeyError, ValueError, FileNotFoundError, RuntimeError, TypeError) as e:
        print(f"zoo {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _segment(a: argparse.Namespace) -> None:
    """``zoo segment``: each image through :func:`zoo.segment` (prepared as the checkpoint's sidecar says), its mask
    written as an 8-bit PNG of the image's size; one line per image with the classes' pixel fractions."""
    import numpy as np
    from PIL import Image

    from zoo.catalog.registry import load_verified
    from zoo.data import read_image
    from zoo.predict import segment

    model, sidecar, path = load_verified(a.name)
    cfg = sidecar.get("preparation")
    if not cfg:
        raise ValueError(f"{path}'s sidecar has no input preparation: it predates zoo's preparation records; "
                         "retrain it, or call zoo.segment(model, image, cfg=...) with the preparation by hand")
    classes = cfg.get("classes") or [str(k) for k in range(cfg["num_classes"])]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = 255 // max(1, len(classes) - 1)
    gray = cfg["data_channels"] == 1
    for f in map(Path, a.images):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such image file")
        mask = segment(model, read_image(f, gray=gray), cfg=cfg, tile=a.tile, overlap=a.overlap)
        target = out / f"{f.stem}-mask.png"
        Image.fromarray((mask.numpy() * scale).astype(np.uint8)).save(target)
        share = ", ".join(f"{c} {float((mask == k).float().mean()):.3f}" for k, c in enumerate(classes))
        print(f"{target} ({mask.shape[1]}x{mask.shape[0]}; {share})")


def _evaluate(a: argparse.Namespace) -> dict:
    from zoo.catalog.registry import load_verified
    from zoo.reproduce import evaluate_checkpoint

    model, sidecar, path = load_verified(a.name)
    dataset, metrics = evaluate_checkpoint(model, sidecar, a.data_dir, a.device, a.test_subset, a.dataset)
    return {"model": sidecar["model"], "checkpoint": str(path), "dataset": dataset, "test": metrics,
            "ledger": sidecar.get("ledger"), "recorded_metrics": sidecar.get("metrics")}


def _card(check: bool) -> int:
    """`zoo card`: write MODEL_CARD.md and its plots (only files whose bytes change; plots of no data set are
    removed) from the cards of models/ (not those of $ZOO_CARDS); ``check``: write nothing, 1 if any differs."""
    import zoo

    from zoo.render import PLOTS_DIR, render_plots
    from zoo.io import atomic_write
    from zoo.catalog.registry import builtin_models

    infos = [zoo.model_info(n) for n in builtin_models()]
    files = {MODEL_CARD_PATH: render_model_card(infos).encode(),
             **{PLOTS_DIR / name: png for name, png in render_plots(infos).items()}}
    stale = [p for p, data in files.items() if not p.exists() or p.read_bytes() != data]
    extra = sorted(p for p in PLOTS_DIR.glob("*.png") if p not in files)
    if check:
        if stale or extra:
            print(f"stale or extra: {', '.join(map(str, stale + extra))}; run `zoo card`", file=sys.stderr)
            return 1
        print(f"{MODEL_CARD_PATH} is up to date (and its {len(files) - 1} plots in {PLOTS_DIR})")
        return 0
    for p in stale:
        atomic_write(p, lambda tmp, data=files[p]: Path(tmp).write_bytes(data))
    for p in extra:
        p.unlink()
    print(f"wrote {MODEL_CARD_PATH} and {len(files) - 1} plots in {PLOTS_DIR} ({len(stale)} changed, "
          f"{len(extra)} removed)")
    return 0


def _reproduce(a: argparse.Namespace) -> int:
    """`zoo reproduce`: print the checks; 0 when all pass, 1 otherwise (errors raise: 2)."""
    from zoo.io import write_text
    from zoo.reproduce import reproduce_by_retraining, reproduce_checkpoint

    tol = {} if a.tolerance is None else {"tolerance": a.tolerance}  # else the defaults of zoo.reproduce
    if a.retrain:
        if a.test_subset is not None:
            raise ValueError("--test-subset does not apply to --retrain: the recorded command sets the test set")
        report = reproduce_by_retraining(a.name, data_dir=a.data_dir, device=a.device, out_dir=a.out,
                                         epsilon=a.epsilon, progress=True, **tol)
    else:
        if a.out or a.epsilon is not None:
            raise ValueError("--out and --epsilon apply to --retrain only (the checkpoint fixes the epsilon)")
        report = reproduce_checkpoint(a.name, data_dir=a.data_dir, device=a.device, test_subset=a.test_subset, **tol)
    print(report.table())
    if a.report:
        write_text(a.report, json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1

if __name__ == "__main__":
    sys.exit(main())
