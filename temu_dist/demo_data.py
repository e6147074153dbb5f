"""Write the offline demo dataset in KADID-10k's released layout: images/ and dmos.csv.

    python -m temu_dist.demo_data --out DIR

Reference photos are the real photos that ship with scikit-image and matplotlib, resized to KADID-10k's 512x384.
Each gets several distortion types at five levels, named as KADID-10k names them: I{ref}_{type}_{level}.png.

MOS rule (the demo's stand-in for human ratings): MOS = 1 + 4 * SSIM(reference, distorted) on the luma channel,
so it lies in KADID-10k's 1-5 range, higher is better, falls with the level and depends on the content. `var` is 0:
no raters were asked.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from temu_dist.atomic import write_text_atomic

SIZE = (512, 384)  # KADID-10k's width x height
# zlib level 1, not Pillow's 6: a 512x384 photo encodes in 23 ms, not 76 ms, and is 9% larger (the demo writes 189).
PNG_LEVEL = 1
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "motorcycle", "grace_hopper"]


def photo(name: str, size: tuple[int, int] = SIZE) -> Image.Image:
    """One of the real photos that ship offline (PHOTOS), RGB, resized to size (width, height)."""
    from matplotlib import cbook
    from skimage import data

    if name == "grace_hopper":
        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            array = np.asarray(Image.open(fh).convert("RGB"))
    elif name == "motorcycle":
        array = data.stereo_motorcycle()[0]
    else:
        array = getattr(data, name)()
    return Image.fromarray(array).convert("RGB").resize(size, Image.BICUBIC)


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


def white_noise(im: Image.Image, sigma: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.asarray(im, dtype=np.float32) + rng.normal(0.0, sigma, (im.height, im.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# KADID-10k type ids where the type exists there: 01 gaussian blur, 09 JPEG, 10 white noise, 19 contrast change.
DISTORTIONS = {
    1: ("gaussian blur", lambda im, lv, seed: im.filter(ImageFilter.GaussianBlur([0.5, 1.0, 2.0, 3.5, 6.0][lv]))),
    9: ("jpeg", lambda im, lv, seed: jpeg(im, [60, 30, 15, 8, 3][lv])),
    10: ("white noise", lambda im, lv, seed: white_noise(im, [4.0, 10.0, 20.0, 35.0, 60.0][lv], seed)),
    19: ("contrast decrease", lambda im, lv, seed: ImageEnhance.Contrast(im).enhance([0.8, 0.6, 0.4, 0.25, 0.1][lv])),
}


def mos(reference: Image.Image, distorted: Image.Image) -> float:
    from skimage.metrics import structural_similarity

    a = np.asarray(reference.convert("L"), dtype=np.float64)
    b = np.asarray(distorted.convert("L"), dtype=np.float64)
    return 1.0 + 4.0 * max(0.0, float(structural_similarity(a, b, data_range=255.0)))


def write_demo_data(out: str | Path) -> Path:
    """Writes DIR/images/*.png and DIR/dmos.csv (dist_img, ref_img, dmos, var); the csv is written last, atomically."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for r, name in enumerate(PHOTOS, start=1):
        ref = photo(name)
        ref_name = f"I{r:02d}.png"
        ref.save(images / ref_name, compress_level=PNG_LEVEL)
        for t, (_, distort) in DISTORTIONS.items():
            for level in range(5):
                dist = distort(ref, level, seed=r * 100 + t * 10 + level)
                dist_name = f"I{r:02d}_{t:02d}_{level + 1:02d}.png"
                dist.save(images / dist_name, compress_level=PNG_LEVEL)
                rows.append((dist_name, ref_name, f"{mos(ref, dist):.4f}", "0.0"))
        print(f"demo_data: {name}: {len(DISTORTIONS) * 5} distorted images", flush=True)
    text = io.StringIO(newline="")
    csv.writer(text).writerows([("dist_img", "ref_img", "dmos", "var"), *rows])
    write_text_atomic(out / "dmos.csv", text.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m temu_dist.demo_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write images/ and dmos.csv into")
    args = parser.parse_args()
    try:
        out = write_demo_data(args.out)
    except OSError as e:
        sys.exit(f"demo_data: cannot write {e.filename or args.out}: {e.strerror or e}")
    print(f"demo_data: wrote {out / 'dmos.csv'}")


if __name__ == "__main__":
    main()
