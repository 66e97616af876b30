"""Tiny runs and the checks the reliability tests share: a run directory must never lie."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from safetensors.torch import load_file, save_file

from flowmaps.build import config_from_dict
from flowmaps.train.loop import train
from flowmaps.train.rundir import file_config_hash
from tests.train.tiny import tiny_values

# --set arguments of a tiny CLI run (12 steps, checkpoints every 4, a small evaluation)
TINY = ["--steps", "12", "--batch-size", "64", "--no-progress", "--set", "model.width=16", "--set", "model.depth=1",
        "--set", "optim.warmup_steps=2", "--set", "eval.n_samples=256", "--set", "eval.ode_steps=2",
        "--set", "eval.nfe=[1]", "--set", "train.log_every=4", "--set", "checkpoint.every=4",
        "--set", "checkpoint.keep_last=2", "--set", "checkpoint.keep_best=false"]  # the two newest checkpoints alone


def tiny(data: Optional[Path] = None, **sections: dict[str, Any]):
    """A tiny config: ``tests.train.tiny.BASE`` (24 steps, checkpoints every 8) with ``sections`` merged in,
    on the ``.npy`` file ``data`` if given."""
    return config_from_dict(tiny_values(data, **sections))


def trained(run_dir: Path, data: Optional[Path] = None, **sections: dict[str, Any]) -> Path:
    """A finished tiny run in ``run_dir`` (no evaluation)."""
    train(tiny(data, **sections), run_dir, progress=False, evaluate_at_end=False)
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def status(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "status.json").read_text())


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses the bare ``NaN`` / ``Infinity`` literals Python would accept."""
    def refuse(name: str) -> None:
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def rewrite_weights(path: Path, change) -> None:
    """Apply ``change(state)`` to a safetensors file in place, keeping its metadata (an adversary's edit)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata=metadata)


def reseal_manifest(run_dir: Path) -> None:
    """Recompute ``manifest.json`` for the weights as they are now (an adversary who also fixes the manifest)."""
    import hashlib

    manifest = json.loads((run_dir / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (run_dir / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def final_weights_belong_to_config(run_dir: Path) -> bool:
    """The invariant: final weights, where present, carry the hash of the config beside them."""
    from safetensors import safe_open

    for name in ("model.safetensors", "model_ema.safetensors"):
        path = run_dir / name
        if path.exists():
            with safe_open(str(path), "pt") as f:
                recorded = (f.metadata() or {}).get("flowmaps_config_hash")
            if recorded != file_config_hash(run_dir):
                return False
    return True
