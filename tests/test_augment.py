import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from temu_dist.data.augment import decode_rgb, to_input
from temu_dist.demo_data import photo


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return TF.pil_to_tensor(im.convert("RGB"))


@pytest.mark.parametrize("fmt, mode, kw", [("PNG", "RGB", {}), ("PNG", "L", {}), ("PNG", "RGBA", {}),
                                           ("JPEG", "RGB", {"quality": 90}), ("JPEG", "L", {"quality": 90}),
                                           ("WEBP", "RGB", {"lossless": True}), ("BMP", "RGB", {})])
def test_decode_gives_what_pil_gives(fmt, mode, kw):
    data = _encoded(photo("coffee", (96, 64)).convert(mode), fmt, **kw)
    x = decode_rgb(data)
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 96)
    # The same libjpeg-turbo and libpng underneath: JPEG may differ by a grey level in the colour conversion.
    assert (x.int() - _pil(data).int()).abs().max() <= (1 if fmt == "JPEG" else 0)


def test_an_animated_gif_decodes_to_its_first_frame_as_pil_shows_it():
    frames = [photo(name, (96, 64)).convert("P") for name in ("coffee", "astronaut")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    x = decode_rgb(buf.getvalue())
    assert x.shape == (3, 64, 96) and torch.equal(x, _pil(buf.getvalue()))


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    im = Image.fromarray(np.arange(64 * 96, dtype=np.uint16).reshape(64, 96) * 10)  # mode I;16
    x = decode_rgb(_encoded(im, "PNG"))
    # PIL would clip to 255 what is above 255; the full 16-bit range maps onto 0..255.
    assert x.dtype == torch.uint8 and x.shape == (3, 64, 96) and int(x.max()) == 61430 * 255 // 65535


def test_unreadable_bytes_raise():
    with pytest.raises(ValueError, match="^not an image torchvision or PIL can decode$"):
        decode_rgb(b"not an image")
    with pytest.raises(ValueError, match="^an empty file$"):
        decode_rgb(b"")


def test_resize_is_within_a_grey_level_of_pil_bicubic():
    im = photo("astronaut", (512, 384))
    x = to_input(TF.pil_to_tensor(im), (448, 448))
    ref = TF.pil_to_tensor(TF.resize(im, [448, 448], interpolation=InterpolationMode.BICUBIC, antialias=True))
    diff = (x.int() - ref.int()).abs()
    assert x.shape == (3, 448, 448) and diff.max() <= 2 and diff.float().mean() < 0.05
    # A PIL image takes the same path; an image at the input size is left as it is.
    assert torch.equal(to_input(im, (448, 448)), x)
    assert torch.equal(to_input(TF.pil_to_tensor(im), (384, 512)), TF.pil_to_tensor(im))
    assert torch.equal(to_input(TF.pil_to_tensor(im), (384, 512), flip=True), TF.pil_to_tensor(im).flip(-1))


def test_a_bilinear_resize_is_within_a_grey_level_of_iqa_pytorchs_on_pil_images():
    im = photo("astronaut", (512, 384))
    ref = TF.pil_to_tensor(TF.resize(im, [448, 448], interpolation=InterpolationMode.BILINEAR))  # torchvision's default
    diff = (to_input(im, (448, 448), resize="bilinear").int() - ref.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05
    # The bicubic one is another resize: 0.91 grey levels from it on average here.
    assert (to_input(im, (448, 448)).int() - ref.int()).abs().float().mean() > 0.5


def test_normalisation_is_the_same_to_the_bit_as_runs_trained_before_had_it():
    # A resumed or re-scored run must see the inputs it was trained on: x / 255, not x * (1 / 255).
    from temu_dist.data.augment import normalize

    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    expected = (x.float() / 255.0 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert torch.equal(normalize(x, mean, std), expected)
