"""Checkpoints: safetensors weights plus a JSON sidecar; never pickle.

``X.safetensors`` holds tensors under prefixes ``model.`` (trained weights), optionally ``ema.`` (EMA weights,
what evaluation uses) and ``optim.`` (optimizer state, for resuming). ``X.json`` holds the model name and
arguments, its card, the privacy ledger, metrics, the training state, the command, the hardware and the
sha256 of ``X.safetensors``. The safetensors header in turn carries the sha256 of the sidecar's body, so an
edit to either file is detected. Both files are written to temporary names and renamed (atomic), the sidecar
last: its rename commits the checkpoint. A crash leaves the previous checkpoint whole and at worst a temporary
file or a weights file without its sidecar, which no load accepts (the training engine removes both on resume).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from zoo.io import atomic_write, sha256_file, write_text

FORMAT = "zoo-checkpoint/1"


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is truncated, tampered with, or does not match its sidecar."""


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()


def paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")  # "NAME.TAG": keep the tag


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_checkpoint(path: str | Path, *, model: nn.Module, model_name: str, model_args: dict, card: dict,
                    ledger: dict | None, metrics: dict | None = None, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, train_state: dict | None = None,
                    weights_only_ema: bool = False, preparation: dict | None = None, training: dict | None = None,
                    half: bool = False) -> Path:
    """Write ``path.safetensors`` + ``path.json`` atomically; return the safetensors path.

    ``weights_only_ema``: publish the EMA weights as the model and nothing else (the form for ``weights/``).
    ``preparation``: how to prepare the input (:func:`zoo.data.preparation`); ``training``: wall time, hardware,
    samples processed, how the seed was chosen. ``half``: store the model's parameters in float16 (buffers stay
    as they are); loading casts them back to the model's dtype.
    """
    st_path, json_path = paths(path)
    tensors: dict[str, torch.Tensor] = {}
    source = ema if (weights_only_ema and ema is not None) else model
    param_names = {n for n, _ in source.named_parameters()}
    for k, v in source.state_dict().items():
        tensors[f"model.{k}"] = v.half() if half and k in param_names and v.is_floating_point() else v
    if ema is not None and not weights_only_ema:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    if optimizer is not None and not weights_only_ema:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, val in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(val):
                        tensors[f"optim.{names[id(p)]}.{key}"] = val
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    body = {
        "format": FORMAT, "model": model_name, "args": model_args, "card": card, "ledger": ledger,
        "metrics": metrics or {}, "train_state": train_state or {}, "file": st_path.name,
        "preparation": preparation, "training": training or {},
        "dtype": "float16 parameters" if half else "as trained",
        "command": " ".join(sys.argv), "hardware": hardware(), "git_commit": git_commit(),
        "torch": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta = {"format": FORMAT, "sidecar_sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    atomic_write(st_path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    sidecar = {**body, "sha256": sha256_file(st_path)}
    write_text(json_path, json.dumps(sidecar, indent=2, default=str) + "\n")
    return st_path


def read_checkpoint(path: str | Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify and read a checkpoint: ``(tensors, sidecar)``. Raises :class:`CheckpointIntegrityError`."""
    st_path, json_path = paths(path)
    for p in (st_path, json_path):
        if not p.exists():
            raise FileNotFoundError(f"checkpoint file {p} is missing (a checkpoint is X.safetensors + X.json)")
    try:
        sidecar = json.loads(json_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointIntegrityError(f"{json_path} is not valid JSON ({e}): truncated or edited") from None
    if sidecar.get("format") != FORMAT or "sha256" not in sidecar:
        raise CheckpointIntegrityError(f"{json_path} is not a {FORMAT} sidecar")
    digest = sha256_file(st_path)
    for want, what in ((sidecar["sha256"], "its sidecar"), (expected_sha256, "the model card")):
        if want is not None and digest != want:
            raise CheckpointIntegrityError(
                f"{st_path} has sha256 {digest} but {what} says {want}: the file is truncated, corrupted or was "
                "replaced. Re-download or re-train it; do not use it.")
    try:
        tensors = load_file(st_path)
        from safetensors import safe_open

        with safe_open(st_path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointIntegrityError(f"{st_path} is not a readable safetensors file ({e})") from None
    body = {k: v for k, v in sidecar.items() if k != "sha256"}
    if meta.get("sidecar_sha256") != hashlib.sha256(_canonical(body)).hexdigest():
        raise CheckpointIntegrityError(
            f"{json_path} does not match the sidecar recorded inside {st_path.name}: the sidecar (ledger, "
            "metrics or model arguments) was edited after saving")
    return tensors, sidecar


PUBLISHED_KEYS = {
    "ledger": "the privacy ledger (epsilon, delta, accountant, sigma, q, steps, clip norm, any public pretraining)",
    "preparation": "how to prepare the input (size, channels, mean/std, resize)",
}
"""What the sidecar of a published checkpoint must carry (:func:`check_published`)."""


def check_published(sidecar: dict, where: str | Path) -> dict:
    """Refuse (:class:`CheckpointIntegrityError`) the sidecar of a published checkpoint that lacks the privacy
    ledger or the input preparation: a user could neither state its guarantee nor feed it correctly."""
    missing = [f"{k} ({what})" for k, what in PUBLISHED_KEYS.items() if not sidecar.get(k)]
    if missing:
        raise CheckpointIntegrityError(
            f"{where} is not a publishable checkpoint: its sidecar has no {' and no '.join(missing)}. Publish runs "
            "with `zoo publish RUN_DIR NAME --tag TAG`, which writes both")
    return sidecar


def published_facts(path: str | Path) -> dict:
    """What ``zoo.model_info`` shows of a published checkpoint, from its sidecar alone (no weights are read): the
    input preparation, the ledger's (epsilon, delta, accountant, steps, pretraining), the metrics and the training
    facts. A sidecar that is not valid JSON or lacks the ledger or the preparation gives ``{"error": ...}``."""
    json_path = paths(path)[1]
    try:
        sidecar = check_published(json.loads(json_path.read_text()), json_path)
    except (OSError, json.JSONDecodeError, CheckpointIntegrityError) as e:
        return {"error": str(e)}
    led = sidecar["ledger"]
    return {"preparation": sidecar["preparation"], "metrics": sidecar.get("metrics", {}),
            "training": sidecar.get("training", {}),
            "privacy": {k: led.get(k) for k in ("dataset", "epsilon", "delta", "accountant", "steps", "pretraining")}}


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], use_ema: bool = True) -> nn.Module:
    """Load a verified checkpoint's weights into ``model`` (the EMA ones when present and ``use_ema``). Building
    the model its sidecar records is :func:`zoo.catalog.registry.load_checkpoint`'s part."""
    state = _section(tensors, "ema.") if use_ema and any(k.startswith("ema.") for k in tensors) else None
    model.load_state_dict(state or _section(tensors, "model."))
    return model


def load_training_state(tensors: dict[str, torch.Tensor], model: nn.Module, ema: nn.Module | None,
                        optimizer: torch.optim.Optimizer | None) -> None:
    """Restore model, EMA and optimizer state from a verified checkpoint's tensors (resuming)."""
    model.load_state_dict(_section(tensors, "model."))
    if ema is not None:
        ema.load_state_dict(_section(tensors, "ema."))
    if optimizer is not None:
        params = dict(model.named_parameters())
        for key, val in _section(tensors, "optim.").items():
            name, _, slot = key.rpartition(".")
            optimizer.state[params[name]][slot] = val.to(params[name].device)
