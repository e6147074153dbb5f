"""temu_dist.fidelity against IQA-PyTorch (pyiqa) on real photos with local and global distortions; its contract."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from pyiqa.archs.ssim_arch import CW_SSIM, SSIM
from torchvision.transforms.functional import pil_to_tensor

from temu_dist.config import LDGConfig
from temu_dist.data.ldg import LocalDistortion
from temu_dist.demo_data import jpeg, photo, white_noise
from temu_dist.fidelity import cw_ssim, main, ssim

TOLERANCE = 1e-3
SQUARE, KADID = (448, 448), (512, 384)  # PIL (width, height)
# (photo, size, distortion): every photo and distortion at least once, two sizes, a handful of pairs.
CASES = [
    ("astronaut", SQUARE, "local"), ("coffee", SQUARE, "blur"), ("chelsea", SQUARE, "noise"),
    ("rocket", SQUARE, "jpeg"), ("grace_hopper", KADID, "local"), ("chelsea", KADID, "blur"),
]


def local_randaugment(im: Image.Image, seed: int) -> Image.Image:
    """A random 40..150 px region pushed through RandAugment(6 ops, magnitude 18) and pasted back, as LDG does."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out, _ = LocalDistortion(LDGConfig())(pil_to_tensor(im))
    return Image.fromarray(out.permute(1, 2, 0).numpy())


def distort(im: Image.Image, kind: str, seed: int) -> Image.Image:
    if kind == "local":
        return local_randaugment(im, seed)
    if kind == "blur":
        return im.filter(ImageFilter.GaussianBlur(2.0))
    if kind == "noise":
        return white_noise(im, 20.0, seed)
    return jpeg(im, 10)


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def paste_blurred(im: Image.Image, radius: float) -> Image.Image:
    """The 150 px square at (150, 150) replaced by its Gaussian blur of this radius."""
    box = (150, 150, 300, 300)
    out = im.copy()
    out.paste(im.crop(box).filter(ImageFilter.GaussianBlur(radius)), box[:2])
    return out


@pytest.fixture(scope="module")
def groups() -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """CASES as (reference, distorted) float batches, one per image size."""
    pairs: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for seed, (name, size, kind) in enumerate(CASES):
        ref = photo(name, size)
        pairs.setdefault(size, []).append((to_tensor(ref), to_tensor(distort(ref, kind, seed))))
    return {size: (torch.stack([a for a, _ in p]), torch.stack([b for _, b in p])) for size, p in pairs.items()}


@pytest.fixture(scope="module")
def pyiqa_scores(groups) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
    """pyiqa's cw_ssim and ssim with their default settings (as pyiqa.create_metric builds them)."""
    reference = {"cw_ssim": CW_SSIM(channels=1, level=4, ori=8, test_y_channel=True),
                 "ssim": SSIM(downsample=False, test_y_channel=True)}
    with torch.no_grad():
        return {metric: {size: net(x, y).float() for size, (x, y) in groups.items()}
                for metric, net in reference.items()}


@pytest.mark.parametrize("metric, fn", [("cw_ssim", cw_ssim), ("ssim", ssim)])
def test_agrees_with_pyiqa_on_distorted_photos(groups, pyiqa_scores, metric, fn):
    for size, (x, y) in groups.items():
        ours, theirs = fn(x, y), pyiqa_scores[metric][size]
        assert ours.shape == theirs.shape == (x.shape[0],)
        assert (theirs < 0.999).any(), "the distortions should be visible to the reference metric"
        assert torch.allclose(ours, theirs, rtol=0, atol=TOLERANCE), (size, ours, theirs)


@pytest.mark.parametrize("level, ori, K", [(3, 4, 0.0), (2, 6, 1e-2)])
def test_cw_ssim_agrees_with_pyiqa_for_other_settings(groups, level, ori, K):
    x, y = (t[:2, :, :160, :128] for t in groups[SQUARE])
    reference = CW_SSIM(channels=1, level=level, ori=ori, K=K, test_y_channel=True)
    with torch.no_grad():
        theirs = reference(x, y).float()
    assert torch.allclose(cw_ssim(x, y, level=level, ori=ori, K=K), theirs, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("fn", [cw_ssim, ssim])
def test_identical_images_score_one(groups, fn):
    for x, _ in groups.values():
        assert torch.allclose(fn(x, x), torch.ones(x.shape[0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fn", [cw_ssim, ssim])
def test_batch_equals_one_pair_at_a_time(groups, fn):
    x, y = groups[SQUARE]
    one_by_one = torch.cat([fn(x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])])
    assert torch.allclose(fn(x, y), one_by_one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fn", [cw_ssim, ssim])
def test_harsher_local_distortion_scores_lower(fn):
    ref = photo("astronaut", SQUARE)
    x = to_tensor(ref)[None].expand(2, -1, -1, -1)
    y = torch.stack([to_tensor(paste_blurred(ref, 2.0)), to_tensor(paste_blurred(ref, 8.0))])
    mild, harsh = fn(x, y).tolist()
    assert harsh < mild < 1.0


def test_float64_input_is_computed_in_float64(groups):
    x, y = groups[KADID]
    assert cw_ssim(x.double(), y.double()).dtype == torch.float64
    assert torch.allclose(cw_ssim(x.double(), y.double()).float(), cw_ssim(x, y), rtol=0, atol=1e-4)


def test_bad_input_raises_value_error():
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="same shape"):
        cw_ssim(x, x[:, :, :, :32])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        cw_ssim(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match="at least 64 px"):
        cw_ssim(x[..., :48, :], x[..., :48, :])


@pytest.fixture
def files(tmp_path):
    ref = photo("chelsea", KADID)
    paths = {"a": tmp_path / "a.png", "b": tmp_path / "b.png", "small": tmp_path / "small.png",
             "corrupt": tmp_path / "corrupt.jpg"}
    ref.save(paths["a"])
    local_randaugment(ref, 7).save(paths["b"])
    ref.resize((256, 192)).save(paths["small"])
    paths["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("metric, fn", [("cw_ssim", cw_ssim), ("ssim", ssim)])
def test_verb_prints_one_json_line(files, capsys, metric, fn):
    assert main([files["a"], files["b"], "--metric", metric]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    expected = fn(to_tensor(Image.open(files["a"]))[None], to_tensor(Image.open(files["b"]))[None])
    assert row["a"] == files["a"] and row["b"] == files["b"] and row["metric"] == metric
    assert row["score"] == pytest.approx(float(expected[0]), abs=1e-6)
    assert row["score"] < 1.0


@pytest.mark.parametrize("other, says", [("corrupt", "cannot read image"), ("small", "size mismatch")])
def test_verb_fails_naming_the_file(files, capsys, other, says):
    assert main([files["a"], files[other]]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and says in err and files[other] in err


def test_verb_reads_16_bit_greys_as_training_does(tmp_path, capsys):
    # PIL's convert("RGB") clips them at 255: most of each image white, and the pair scored as near alike.
    grey = np.random.default_rng(0).integers(0, 65536, (64, 96), dtype=np.uint16)
    scores = []
    for name, image in (("16", grey), ("8", (grey >> 8).astype(np.uint8))):
        Image.fromarray(image).save(tmp_path / f"a{name}.png")
        Image.fromarray(np.ascontiguousarray(image[:, ::-1])).save(tmp_path / f"b{name}.png")
        assert main([str(tmp_path / f"a{name}.png"), str(tmp_path / f"b{name}.png"), "--metric", "ssim"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["score"])
    assert Image.open(tmp_path / "a16.png").mode == "I;16"
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) and scores[1] < 0.5
