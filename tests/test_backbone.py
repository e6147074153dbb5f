import socket
import time

import huggingface_hub
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from temu_dist.config import ConfigError
from temu_dist.model import backbone as backbone_mod
from temu_dist.model.backbone import (Backbone, PatchEmbed, check_backbone, compute_dtype, create_clip, layer_indices,
                                      pretrained_weights, weights_cached, weights_said)
from temu_dist.model.temu import build_model
from tests.conftest import tiny_config


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_last_cls_through_ln_post_and_proj_is_encode_image(quick_gelu):
    cfg = tiny_config("model.layers=only:4", f"model.quick_gelu={str(quick_gelu).lower()}")
    clip = create_clip(cfg.model)
    bb = Backbone(clip, cfg.model)
    # QuickGELU runs as SiLU with its scale folded into the weights around it (one kernel instead of three).
    assert {type(block.mlp.gelu) for block in bb.visual.transformer.resblocks} == \
        {torch.nn.SiLU if quick_gelu else torch.nn.GELU}
    x = torch.randn(3, 3, 64, 64) * 3
    cls, patches = bb(x)
    assert cls.shape == (3, 1, 64) and patches.shape == (3, 1, 16, 64)
    torch.testing.assert_close(bb.project(cls[:, 0]).float(), clip.encode_image(x), rtol=1e-5, atol=1e-5)
    want = clip.visual.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True,
                                             output_extra_tokens=True)["image_intermediates"][0]
    torch.testing.assert_close(patches[:, 0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_patch_embedding_as_a_matmul_is_the_convolution_plus_the_positions(bias):
    conv = torch.nn.Conv2d(3, 8, kernel_size=(4, 5), stride=(4, 5), bias=bias)
    positions = torch.randn(4 * 4, 8)
    x = torch.randn(2, 3, 18, 23)  # not a whole number of patches: the convolution drops the remainder
    want = conv(x) + positions.T.reshape(1, 8, 4, 4)
    torch.testing.assert_close(PatchEmbed(conv, positions, (4, 4))(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="kernel=stride"):
        PatchEmbed(torch.nn.Conv2d(3, 8, kernel_size=4, stride=2), positions, (4, 4))


@pytest.mark.parametrize("size", [48, 96])
def test_a_backbone_scores_other_input_sizes_as_open_clip_built_at_that_size_would(size):
    # open_clip resizes a checkpoint's positional embeddings when a model is made at another input size; a backbone
    # built at 64 and given a size x size image must see the same tokens.
    built = tiny_config("model.layers=all").model
    clip = create_clip(built)
    other = create_clip(tiny_config("model.layers=all", f"model.image_size={size}").model)
    state = clip.state_dict()
    open_clip.model.resize_pos_embed(state, other)
    other.load_state_dict(state)
    x = torch.randn(2, 3, size, size)
    ours = Backbone(clip, built)(x)
    assert ours[1].shape == (2, 4, (size // 16) ** 2, 64)
    for mine, theirs in zip(ours, Backbone(other, built)(x), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec, selected, kept", [("all", [0, 1, 2, 3], 4), ("upto:2", [0, 1], 2),
                                                  ("only:3", [2], 3), ("only:1", [0], 1)])
def test_layer_selection_shapes_and_pruning(spec, selected, kept):
    cfg = tiny_config(f"model.layers={spec}")
    clip = create_clip(cfg.model)
    bb = Backbone(clip, cfg.model)
    assert bb.indices == selected
    assert len(bb.visual.transformer.resblocks) == kept
    cls, patches = bb(torch.randn(2, 3, 64, 64))
    assert cls.shape == (2, len(selected), 64) and patches.shape == (2, len(selected), 16, 64)
    # The pruned tower gives the same tokens as the full one at the selected layers.
    full = Backbone(clip, tiny_config("model.layers=all").model)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(bb(x)[1], full(x)[1][:, selected])


def test_layer_beyond_the_backbone_names_the_key():
    with pytest.raises(ConfigError, match="model.layers: upto:9 .* 4 layers"):
        layer_indices("upto:9", 4)


def test_non_square_input_keeps_native_resolution():
    cfg = tiny_config("model.backbone=Test-Tiny-ViT-14", "model.image_size=[384, 512]")
    bb = Backbone(create_clip(cfg.model), cfg.model)
    assert bb.grid == (27, 36)
    cls, patches = bb(torch.randn(1, 3, 384, 512))
    assert patches.shape == (1, 3, 27 * 36, 64)


def test_backbone_is_frozen_and_keeps_no_graph_unless_its_input_asks_for_one():
    cfg = tiny_config()
    bb = Backbone(create_clip(cfg.model), cfg.model)
    bb.train()
    assert not bb.training
    assert not any(p.requires_grad for p in bb.parameters())
    cls, patches = bb(torch.randn(1, 3, 64, 64))
    assert not cls.requires_grad and not patches.requires_grad  # no autograd graph kept in training
    # Images that require grad (a score used as a loss) get their gradient; the weights still get none.
    images = torch.randn(1, 3, 64, 64, requires_grad=True)
    cls, patches = bb(images)
    (cls.sum() + patches.sum()).backward()
    assert images.grad.abs().sum() > 0 and all(p.grad is None for p in bb.parameters())
    with torch.no_grad():
        assert not bb(images)[1].requires_grad


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match=r"model.backbone: unknown open_clip model 'ViT-L-41'.*ViT-L-14"):
        create_clip(tiny_config("model.backbone=ViT-L-41").model)


@pytest.mark.parametrize("name", ["RN50", "convnext_base", "coca_ViT-L-14", "ViT-H-14-CLIPA"])
def test_a_tower_that_is_no_cls_token_vit_is_refused_from_its_config_alone(name, monkeypatch):
    # ResNet, timm, attention-pooled and average-pooled towers: before any weights are fetched or a model is built.
    monkeypatch.setattr(open_clip, "create_model", None)
    with pytest.raises(ConfigError, match=rf"^model.backbone: '{name}' has no \[cls\]-token ViT image tower"):
        check_backbone(tiny_config(f"model.backbone={name}").model)


def test_openais_own_spelling_of_a_model_takes_open_clips_tags_and_their_activation():
    # ViT-B/32 is open_clip's ViT-B-32: OpenAI's weights known, and wanting QuickGELU, without a download.
    cfg = tiny_config("model.backbone=ViT-B/32", "model.pretrained=openai").model
    assert pretrained_weights(cfg) == (None, False, True)
    assert pretrained_weights(tiny_config("model.backbone=ViT-B/32", "model.pretrained=laion2b_s34b_b79k").model) \
        == (None, False, False)


def test_unknown_tag_and_missing_file_say_how_to_pass_a_path():
    with pytest.raises(ConfigError, match="unknown pretrained tag 'laion9'.*local checkpoint path"):
        create_clip(tiny_config("model.pretrained=laion9").model)
    with pytest.raises(ConfigError, match="checkpoint file not found '/nowhere/w.pt'"):
        create_clip(tiny_config("model.pretrained=/nowhere/w.pt").model)


def test_weights_that_cannot_be_fetched_say_how_to_pass_a_local_file(monkeypatch, tmp_path, no_network):
    def offline(*args, **kwargs):
        raise RuntimeError("We couldn't connect to the Hub to download the files")

    # The Hub answers, but open_clip's download fails all the same.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(backbone_mod, "_hub_unreachable", lambda repo, filename: None)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    cfg = tiny_config("model.backbone=ViT-B-32", "model.pretrained=openai", "model.image_size=224")
    with pytest.raises(ConfigError, match="could not fetch 'openai' weights for ViT-B-32.*model.pretrained=/path/to.*"
                                          "model.quick_gelu=true"):
        backbone_mod.create_clip(cfg.model)


@pytest.fixture
def no_network(monkeypatch):
    """A machine with no network: every name lookup and connection fails at once, and is recorded."""
    attempts = []

    def lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no network in tests")

    def connect(sock, address):
        attempts.append(address)
        raise OSError(101, "no network in tests")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture
def hub_tag(monkeypatch, tmp_path):
    """An open_clip pretrained tag, 'tiny', for Test-Tiny-ViT-16, whose weights live on the Hub in the way open_clip's
    own tags' do (OpenAI's mean and std would hide a lost preprocessing config, so it has others); an empty Hugging
    Face cache, HF_HUB_OFFLINE unset. Returns the cache folder."""
    tag = open_clip.pretrained._pcfg(hf_hub="temu-test/tiny-clip/", quick_gelu=True, mean=(0.1, 0.2, 0.3),
                                     std=(0.4, 0.5, 0.6), interpolation="bilinear", resize_mode="squash")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "Test-Tiny-ViT-16", {"tiny": tag})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return tmp_path


def _put_in_hub_cache(cache, state: dict, filename: str, repo: str = "temu-test/tiny-clip") -> str:
    """Files a checkpoint as huggingface_hub's cache holds a downloaded one: refs/main names a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_whether_a_tags_weights_are_cached_is_looked_up_without_the_network(hub_tag, no_network, filename):
    cfg = tiny_config("model.pretrained=tiny").model
    assert weights_said(cfg) == "weights tiny (not in the Hugging Face cache: fetched from the Hub as the run " \
        "starts, which a node without network cannot)"
    _put_in_hub_cache(hub_tag, {"w": torch.zeros(1)}, filename)
    assert weights_cached("Test-Tiny-ViT-16", "tiny") is True
    assert weights_said(cfg) == "weights tiny (in the Hugging Face cache)"
    assert weights_said(tiny_config().model) == "random weights"
    assert not no_network


@pytest.mark.parametrize("filename", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_a_tags_weights_in_the_hub_cache_load_with_no_network_as_open_clip_loads_the_tag(
        hub_tag, no_network, monkeypatch, filename):
    # Offline, open_clip asks the Hub for the tag's weights before it looks in the cache, and retries for the
    # .safetensors file it looks for first (23 s, the .bin cached).
    source = create_clip(tiny_config("model.quick_gelu=true").model, seed=123)
    path = _put_in_hub_cache(hub_tag, source.state_dict(), filename)
    clip = create_clip(tiny_config("model.pretrained=tiny").model)
    assert no_network == []
    # Just what open_clip makes of the tag where its download finds the file.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kwargs: path)
    want = open_clip.create_model("Test-Tiny-ViT-16", pretrained="tiny", force_image_size=(64, 64),
                                  force_quick_gelu=True)
    assert clip.visual.preprocess_cfg == want.visual.preprocess_cfg
    assert clip.visual.preprocess_cfg["mean"] == (0.1, 0.2, 0.3) and clip.visual.preprocess_cfg["size"] == (64, 64)
    assert (clip.visual.image_mean, clip.visual.image_std) == (want.visual.image_mean, want.visual.image_std)
    assert _activations(clip) == _activations(want) == {"QuickGELU"}
    assert clip.state_dict().keys() == want.state_dict().keys()
    for key, value in want.state_dict().items():
        torch.testing.assert_close(clip.state_dict()[key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(clip.state_dict()[key], source.state_dict()[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("offline_mode", [False, True])
def test_weights_neither_cached_nor_reachable_fail_at_once(hub_tag, no_network, monkeypatch, offline_mode, caplog):
    # With no network, huggingface_hub retries each of the two files open_clip asks for 5 times (46 s) before
    # open_clip gives up; with HF_HUB_OFFLINE=1 it asks no one.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline_mode)
    why = "HF_HUB_OFFLINE is set" if offline_mode else "offline\\? no answer from the Hub"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"could not fetch 'tiny' weights for Test-Tiny-ViT-16 \\({why}.*\\): "
                                          "download open_clip_pytorch_model.bin of "
                                          "huggingface.co/temu-test/tiny-clip once.*"
                                          "model.quick_gelu=true; or copy that machine's Hugging Face cache"):
        create_clip(tiny_config("model.pretrained=tiny").model)
    assert time.perf_counter() - start < 10
    assert "Failed to download" not in caplog.text, "the cache lookup's miss is not an error of its own"
    if offline_mode:
        assert no_network == []


def test_random_weights_asked_for_are_built_without_open_clips_warning_which_is_left_to_others(caplog):
    create_clip(tiny_config().model)  # model.pretrained null
    assert "No pretrained weights loaded" not in caplog.text
    open_clip.create_model("Test-Tiny-ViT-16")  # the filter gone with the build
    assert "No pretrained weights loaded for model 'Test-Tiny-ViT-16'" in caplog.text


def test_pretrained_positions_are_resized_once_from_their_own_grid_to_any_input_size(tmp_path):
    source = create_clip(tiny_config().model, seed=123)  # 64x64 in patches of 16: a 4x4 grid
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    same = create_clip(tiny_config(f"model.pretrained={path}", "model.quick_gelu=false").model, seed=0)
    torch.testing.assert_close(same.visual.conv1.weight, source.visual.conv1.weight)
    cfg = tiny_config(f"model.pretrained={path}", "model.quick_gelu=false", "model.image_size=128").model
    embed = Backbone(create_clip(cfg), cfg).visual.conv1
    grid = source.visual.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)

    def resized(pos, size):
        out = torch.nn.functional.interpolate(pos, size=size, mode="bicubic", antialias=True, align_corners=False)
        return out[0].permute(1, 2, 0)

    # At the configured size, what open_clip makes of the checkpoint (it resizes as it loads).
    built = open_clip.create_model("Test-Tiny-ViT-16", pretrained=str(path), force_image_size=(128, 128))
    torch.testing.assert_close(embed.positions_for(8, 8), built.visual.positional_embedding[1:].detach())
    # Any other size (KADID-10k's 384x512 for a model built at 448): one resize from the checkpoint's own grid, not a
    # second pass over the configured size's.
    torch.testing.assert_close(embed.positions_for(6, 10), resized(grid, (6, 10)).reshape(60, -1))
    twice = resized(resized(grid, (8, 8)).permute(2, 0, 1)[None], (6, 10)).reshape(60, -1)
    assert not torch.allclose(embed.positions_for(6, 10), twice, atol=1e-4)


def _activations(clip) -> set[str]:
    return {type(block.mlp.gelu).__name__ for tower in (clip.visual.transformer, clip.transformer)
            for block in tower.resblocks}


def test_a_state_dict_file_needs_quick_gelu_said_and_gets_what_is_said(tmp_path):
    # OpenAI's weights were trained with QuickGELU; a state dict cannot tell, and GELU would run them without an error.
    path = tmp_path / "weights.bin"
    torch.save(create_clip(tiny_config().model, seed=123).state_dict(), path)
    with pytest.raises(ConfigError, match=f"model.quick_gelu: say true or false for {path}"):
        create_clip(tiny_config(f"model.pretrained={path}").model)
    assert _activations(create_clip(tiny_config(f"model.pretrained={path}", "model.quick_gelu=true").model)) == \
        {"QuickGELU"}
    assert _activations(create_clip(tiny_config(f"model.pretrained={path}", "model.quick_gelu=false").model)) == \
        {"GELU"}


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # making the stand-in archive
def test_a_torchscript_archive_is_openais_release_and_loads_with_quick_gelu(tmp_path):
    # OpenAI's own files hold their weights as a TorchScript module's state; mimic one, holding a tiny CLIP's weights.
    source = create_clip(tiny_config().model, seed=123)

    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in source.state_dict().items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    path = tmp_path / "ViT-Tiny.pt"
    torch.jit.save(torch.jit.script(root), path)
    clip = create_clip(tiny_config(f"model.pretrained={path}").model)
    assert _activations(clip) == {"QuickGELU"}
    torch.testing.assert_close(clip.visual.conv1.weight, source.visual.conv1.weight)
    torch.testing.assert_close(clip.token_embedding.weight, source.token_embedding.weight)


def test_random_backbone_is_seeded():
    a = create_clip(tiny_config().model, seed=5)
    b = create_clip(tiny_config().model, seed=5)
    c = create_clip(tiny_config().model, seed=6)
    assert torch.equal(a.visual.proj, b.visual.proj) and not torch.equal(a.visual.proj, c.visual.proj)


def test_compiled_model_scores_and_learns_as_the_eager_one(monkeypatch):
    from temu_dist.model.temu import build_model

    # Traced by Dynamo and AOTAutograd, where the model's own Python could go astray, onto eager kernels: inductor's
    # C++ for this model took 42-65 s here with its caches cold, as on a fresh CI machine (9 s warm). The bench's
    # compile-modes test compiles and steps the model with inductor itself.
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kwargs: real(model, backend="aot_eager", **kwargs))
    x = torch.randn(2, 3, 64, 64)
    eager = build_model(tiny_config("model.prompt=coop"))
    compiled = build_model(tiny_config("model.prompt=coop", "model.compile=true"))
    assert compiled._compiled_call_impl is not None  # model.compile=true compiled it
    scores = [m(x).score for m in (eager, compiled)]
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-5, atol=1e-6)
    for score in scores:
        score.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.requires_grad:
            # Fused kernels sum in another order: fp32 rounding, on the scale of the largest gradient. log_tau_w's is a
            # sum of terms of both signs: over 300 random inputs it differed by up to 1.9e-4 of itself, the others 6e-6.
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5 * p.grad.abs().max().item(), msg=name)


@pytest.mark.parametrize(("overrides", "hw"), [((), (64, 64)),
                                               (("model.layers=upto:1", "model.precision=bf16"), (48, 80))])
def test_tokens_bytes_is_the_size_of_one_images_tower_output(overrides, hw):
    cfg = tiny_config(*overrides)
    bb = Backbone(create_clip(cfg.model), cfg.model, compute_dtype(cfg.model.precision, torch.device("cpu")))
    cls, patches = bb(torch.rand(3, 3, *hw))
    assert bb.tokens_bytes(*hw) == (cls.nbytes + patches.nbytes) / 3


@pytest.mark.parametrize(("capability", "name"), [((7, 0), "Tesla V100-SXM2-32GB"), ((8, 6), "NVIDIA RTX A6000")])
def test_bf16_on_a_gpu_without_bf16_tensor_cores_is_warned_of_and_fp16_offered(monkeypatch, recwarn, capability,
                                                                                 name):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    said = [str(w.message) for w in recwarn]
    assert said == (["model.precision=auto: Tesla V100-SXM2-32GB (compute capability 7.0) has no bf16 tensor cores; "
                     "model.precision=fp16, launched with --mixed_precision fp16, runs the frozen tower on its fp16 "
                     "ones"] if capability < (8, 0) else [])
    assert compute_dtype("fp16", torch.device("cuda")) == torch.float16 and len(recwarn) == len(said)


@pytest.mark.filterwarnings("ignore:model.precision=fp16. this CPU runs")
def test_an_fp16_tower_scores_as_the_fp32_one_does():
    """fp16 for GPUs without bf16 tensor cores: the tiny tower runs in it on the CPU too."""
    fp32, fp16 = build_model(tiny_config()), build_model(tiny_config("model.precision=fp16"))
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        cls, patches = fp16.backbone(images)
        assert cls.dtype == patches.dtype == torch.float16
        torch.testing.assert_close(fp16(images).score, fp32(images).score, rtol=0, atol=2e-3)


@pytest.mark.parametrize("slower", [85.0, 1.5])
@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_on_a_cpu_that_runs_it_slowly_is_warned_of(monkeypatch, recwarn, slower, precision, dtype):
    """On an AVX2-only CPU a bf16 matmul ran 110 times slower than fp32 (on another, 48 times; fp16 49), and nothing
    said so."""
    monkeypatch.setattr(backbone_mod, "cpu_slowdown", lambda asked: slower if asked == dtype else pytest.fail(asked))
    assert compute_dtype(precision, torch.device("cpu")) == dtype
    said = [str(w.message) for w in recwarn]
    assert said == ([f"model.precision={precision}: this CPU runs a {precision} matmul 85x slower than fp32 (it has "
                     f"no {precision} instructions); model.precision=auto (fp32 on a CPU) runs far faster"]
                    if slower > 4 else [])
    monkeypatch.setattr(backbone_mod, "cpu_slowdown", lambda asked: pytest.fail("measured for fp32"))
    assert compute_dtype("auto", torch.device("cpu")) == compute_dtype("fp32", torch.device("cpu")) == torch.float32


def test_the_cpus_half_precision_slowdown_is_measured_once():
    backbone_mod.cpu_slowdown.cache_clear()
    first = backbone_mod.cpu_slowdown(torch.bfloat16)
    assert first > 0 and backbone_mod.cpu_slowdown(torch.bfloat16) is first
