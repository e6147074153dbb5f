import json

import numpy as np
import pytest
import torch
from PIL import Image

from temu_dist.data.augment import to_input
from temu_dist.model.io import save_model
from temu_dist.model.temu import build_model
from temu_dist.predict import predict
from temu_dist.scorer import Scorer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = tiny_config("model.prompt=coop")
    path = tmp_path_factory.mktemp("run")
    save_model(build_model(config), config, path)
    return path


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i, (w, h) in enumerate([(80, 60), (64, 64), (33, 90)]):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_files_images_and_tensors_of_the_same_pixels_score_alike_and_as_predict_prints(run, photos, capsys):
    scorer = Scorer.load(run)
    from_files = scorer(photos, batch_size=2)
    assert from_files.shape == (3,) and from_files.dtype == torch.float32
    torch.testing.assert_close(Scorer.load(run, device="cpu")(photos), from_files)  # a device named as .to() takes it
    assert predict(["--checkpoint", str(run), *map(str, photos)]) == 0
    printed = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert from_files.tolist() == pytest.approx(printed, abs=1e-6)
    pils = [Image.open(p) for p in photos]
    torch.testing.assert_close(scorer(pils), from_files)
    uint8 = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in pils]
    torch.testing.assert_close(scorer(uint8), from_files)
    assert float(scorer(photos[0])) == pytest.approx(float(from_files[0]), abs=1e-6)  # one image, not a list
    # A float batch in [0, 1] at one size: resized from float, so close to the uint8 path, not equal.
    same_size = torch.stack([u.float() / 255 for u in uint8[:1] * 2])
    assert scorer(same_size).tolist() == pytest.approx([float(from_files[0])] * 2, abs=2e-3)
    assert scorer([]).shape == (0,)
    torch.testing.assert_close(scorer(p for p in photos), from_files)  # any iterable
    with pytest.raises(TypeError, match="^an image is a file path, a PIL image or a \\[3, H, W\\] tensor, not a "
                                        "ndarray$"):
        scorer([np.zeros((8, 8, 3), dtype=np.uint8)])


def test_a_16_bit_grey_image_scores_as_its_8_bit_copy(run):
    wide = np.linspace(0, 65535, 64 * 80).reshape(64, 80).astype(np.uint16)
    scores = Scorer.load(run)([Image.fromarray(wide), Image.fromarray((wide >> 8).astype(np.uint8))])
    assert float(scores[0]) == float(scores[1])


@pytest.mark.parametrize(("image", "says"), [
    (torch.rand(3, 32, 32) * 255, r"a float image is read as \[0, 1\] \(up to 0.25 past it as it is\); this one spans "
                                  r"\[0.*, 25\d.*\]: divide 0-255 values by 255 \(or pass uint8\), map -1..1 ones by "
                                  r"\(x \+ 1\) / 2$"),
    (torch.rand(3, 32, 32) * 2 - 1, r"this one spans \[-0.9.*, 0.9.*\]: .* map -1..1 ones by \(x \+ 1\) / 2$"),
    (torch.rand(32, 32, 3), r"an image tensor is \[3, H, W\] \(a batch \[N, 3, H, W\]\); this one is \[32, 32, 3\]"),
    (torch.full((3, 32, 32), float("nan")), r"^a float image holds NaN or infinite values$"),  # no scale helps it
])
def test_tensors_it_would_misread_are_refused_naming_what_they_are(run, image, says):
    with pytest.raises(ValueError, match=says):
        Scorer.load(run)(image)


def test_it_is_a_module_that_says_what_it_scores_with(run):
    scorer = Scorer.load(run)
    assert scorer.to("cpu") is scorer and scorer.device == torch.device("cpu")
    assert repr(scorer) == ("Scorer(Test-Tiny-ViT-16, variant=I, prompt=coop, layers=all, image_size=64, "
                            "device=cpu)")
    assert (scorer.lower_better, scorer.score_range) == (False, (0.0, 1.0))
    assert not scorer.training and not scorer.model.training  # as a metric is used


@pytest.mark.parametrize("variant", ["I", "S"])
def test_scores_of_images_that_require_grad_carry_their_gradient_as_a_loss(tmp_path, variant, recwarn):
    config = tiny_config("model.prompt=cocoop", f"model.variant={variant}", "model.layer_norm=true")
    save_model(build_model(config), config, tmp_path)
    scorer = Scorer.load(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 70, 90, generator=g) * 0.8 + 0.1
    plain = scorer(x)
    assert not plain.requires_grad
    x.requires_grad_()
    scores = scorer(x, batch_size=1)
    torch.testing.assert_close(scores.detach(), plain)
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.parameters())  # the scorer stays as it was
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]
    # It is the scores' gradient: a small step along a direction moves them by its dot product with it.
    d = torch.randn(x.shape, generator=g)
    d, eps = d / d.norm(), 0.05
    with torch.no_grad():
        moved = (scorer(x + eps * d).sum() - scorer(x - eps * d).sum()) / (2 * eps)
    assert float(moved) == pytest.approx(float((x.grad * d).sum()), rel=0.02)
    # An optimiser's step may push pixels a little past [0, 1]: scored as they are, not refused.
    with torch.no_grad():
        x += 0.2 * x.grad.sign()
    assert x.min() < 0 or x.max() > 1
    scorer(x).sum().backward()


def test_an_untrained_head_scores_from_a_config(tmp_path, photos):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  backbone: Test-Tiny-ViT-16\n  pretrained: null\n  image_size: 64\n")
    scorer = Scorer.from_config(cfg)
    assert scorer.config.model.prompt == "none"  # not the trained default, cocoop, whose context would be random
    scores = scorer(photos)
    assert ((scores > 0) & (scores < 1)).all()
    assert Scorer.from_config(cfg, ["model.prompt=coop"]).config.model.prompt == "coop"
    # Resized as the loaders resize: model.resize.
    bilinear = Scorer.from_config(cfg, ["model.resize=bilinear"])
    x = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    assert torch.equal(bilinear._prepared(x), to_input(x, (64, 64), resize="bilinear").float() / 255)
