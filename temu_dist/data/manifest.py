"""A pack's manifest.json, which the packer writes last: read by the streams, by pack --verify and by a pack rerun into
a finished folder. Its own module so the packer does not import the streams (torch, webdataset)."""
from __future__ import annotations

import json
from pathlib import Path

from temu_dist.config import ConfigError

MANIFEST = "manifest.json"


class ShardsMissing(ConfigError):
    """A shard folder or split that is not there; the message says which pack command makes it."""


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardsMissing(f"{path} not found: make the shards first, e.g. python -m temu_dist.pack --dataset NAME "
                            f"--root DATASET_DIR --out {folder}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardsMissing(f"{path}: unreadable ({e}): rerun the pack command that made {folder}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ShardsMissing(f"{path}: not a pack manifest (no 'splits'): rerun the pack command that made {folder}")
    return manifest
