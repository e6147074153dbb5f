"""Tiny randomly initialised open_clip models, registered here, so no test downloads anything."""
from __future__ import annotations

import json
import os
import signal

import open_clip
import pytest
import torch

from temu_dist.config import Config, load_config

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# pytest-xdist runs tests side by side: each worker's torch, and the processes its tests start, share the cores out
# rather than each spinning a thread per core.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 0)):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY = {
    # Patch 16 on a 64px input: a 4x4 grid; 4 layers so every layer selection has something to select.
    "Test-Tiny-ViT-16": {"embed_dim": 32,
                         "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "head_width": 32, "patch_size": 16},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
    # Patch 14, as ViT-L/14, where KADID-10k's 384x512 is not a whole number of patches.
    "Test-Tiny-ViT-14": {"embed_dim": 32,
                         "vision_cfg": {"image_size": 56, "layers": 3, "width": 64, "head_width": 32, "patch_size": 14},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}},
}


@pytest.fixture(autouse=True)
def no_tracking_uri_left_over():
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI; a later test's subprocesses would take it for the user's."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def sigchld_put_back():
    """A SIGTERM met by temu_dist.stop leaves SIGCHLD as a stopping process wants it: the next test gets torch's back,
    which reports a killed data worker."""
    before = signal.getsignal(signal.SIGCHLD)
    yield
    if before is not None:
        signal.signal(signal.SIGCHLD, before)


@pytest.fixture(scope="session", autouse=True)
def migrated_mlflow_store(tmp_path_factory):
    """A new sqlite store runs every MLflow schema migration (1.6-2.8 s here), and the tests make about 74 in their own
    processes: those start as a copy of one store migrated here. Stores made in processes the tests start still
    migrate, as a user's do."""
    import functools
    import sqlite3
    from contextlib import closing

    import sqlalchemy
    from mlflow.store.db import utils

    migrate = utils._initialize_tables

    @functools.cache  # at the first store, so a worker whose tests make none skips it
    def template() -> str:
        path = tmp_path_factory.mktemp("mlflow") / "migrated.db"
        engine = sqlalchemy.create_engine(f"sqlite:///{path}")
        migrate(engine)
        engine.dispose()
        return str(path)

    def copy_migrated(engine):
        if engine.url.get_backend_name() != "sqlite" or engine.url.database in (None, "", ":memory:"):
            return migrate(engine)
        with closing(sqlite3.connect(template())) as source, closing(sqlite3.connect(engine.url.database)) as target:
            source.backup(target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "_initialize_tables", copy_migrated)
        yield


@pytest.fixture(scope="session", autouse=True)
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model_configs")
    for name, cfg in TINY.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return folder


# A tiny random model on the CPU, as overrides (for the command-line entry points too).
TINY_OVERRIDES = ["model.backbone=Test-Tiny-ViT-16", "model.pretrained=null", "model.image_size=64",
                  "model.n_ctx=4", "device=cpu"]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*TINY_OVERRIDES, *overrides])


def write_kadid(root, refs: int = 5, per_ref: int = 5, size: tuple[int, int] = (48, 32), seed: int = 0):
    """A tiny dataset in KADID-10k's released layout (images/, dmos.csv); returns {images/dist_img: (ref_img, dmos)},
    keyed by the path relative to the root, as the readers name images."""
    import csv

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    labels = {}
    for r in range(1, refs + 1):
        ref = f"I{r:02d}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(images / ref)
        for k in range(1, per_ref + 1):
            name = f"I{r:02d}_{k:02d}_01.png"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(images / name)
            labels[name] = (ref, round(float(rng.uniform(1, 5)), 3))
    with open(root / "dmos.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dist_img", "ref_img", "dmos", "var"])
        for name, (ref, mos) in labels.items():
            writer.writerow([name, ref, mos, 0.1])
    return {f"images/{name}": value for name, value in labels.items()}
