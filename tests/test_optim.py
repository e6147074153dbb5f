import math

import pytest
import torch

from temu_dist.config import ConfigError, Notice
from temu_dist.model.temu import build_model
from temu_dist.optim import epoch_schedule, lengthen, make_optimizer, make_scheduler

from tests.conftest import tiny_config

LR = 0.002


def _moved_by_decay(optimizer_overrides: tuple[str, ...]) -> dict[str, bool]:
    """Which trained parameters of a CoCoOp model with per-layer LayerNorms one step with zero gradients moves: only
    weight decay can (each set to 0.5 first: some start at 0, where decay does nothing)."""
    config = tiny_config("model.prompt=cocoop", "model.layer_norm=true", f"train.lr={LR}", "train.weight_decay=0.1",
                         *optimizer_overrides)
    model = build_model(config)
    optimizer = make_optimizer(model, config)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trained.values():
            p.fill_(0.5)
    before = {n: p.detach().clone() for n, p in trained.items()}
    for p in trained.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {n: not torch.equal(p.detach(), before[n]) for n, p in trained.items()}


def test_adamw_decays_the_matrices_alone_and_adam_every_trained_parameter():
    moved = _moved_by_decay(("train.optimizer=adamw",))
    decayed = {n for n, m in moved.items() if m}
    assert decayed == {"prompts.ctx", "prompts.meta_net.0.weight", "prompts.meta_net.2.weight"}
    assert {"log_tau_w", "layer_logits", "layer_norms.0.weight", "prompts.meta_net.0.bias"} <= set(moved) - decayed
    # The seed's Adam: weight decay as an L2 term in every parameter's gradient.
    assert all(_moved_by_decay(("train.optimizer=adam",)).values())


def _rates(config, steps_per_epoch: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.train.lr)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_climbs_linearly_to_the_rate_then_a_cosine_over_the_rest_anneals_it():
    config = tiny_config(f"train.lr={LR}", "train.epochs=2", "train.warmup_steps=3")
    expected = [LR * (i + 1) / 4 for i in range(3)] + [LR * (1 + math.cos(math.pi * i / 7)) / 2 for i in range(7)]
    assert _rates(config, 5, 10) == pytest.approx(expected, rel=1e-9)
    # Without warmup, the seed's cosine over the run from the first step.
    plain = tiny_config(f"train.lr={LR}", "train.epochs=2")
    assert _rates(plain, 5, 10) == pytest.approx([LR * (1 + math.cos(math.pi * i / 10)) / 2 for i in range(10)],
                                                 rel=1e-9)


@pytest.mark.parametrize("warmup", [0, 3])
def test_a_schedule_made_longer_goes_on_from_its_step_on_a_cosine_of_the_new_length(warmup):
    config = tiny_config(f"train.lr={LR}", "train.epochs=2", f"train.warmup_steps={warmup}", "train.optimizer=adamw",
                         "model.prompt=cocoop")
    model = build_model(config)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, 5)
    for _ in range(10):  # the whole 10-step schedule, ended at 0
        optimizer.step()
        scheduler.step()
    step, before, after = lengthen(scheduler, 20)
    cosine = [LR * (1 + math.cos(math.pi * (t - warmup) / (20 - warmup))) / 2 for t in range(10, 20)]
    assert (step, before) == (10, pytest.approx(0, abs=1e-12)) and after == pytest.approx(cosine[0], rel=1e-9)
    rates = []
    for _ in range(10):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert rates == [pytest.approx([rate] * len(optimizer.param_groups), rel=1e-9) for rate in cosine]


def test_a_schedule_made_longer_within_its_warmup_climbs_on_and_lengthens_the_cosine_to_come():
    config = tiny_config(f"train.lr={LR}", "train.epochs=2", "train.warmup_steps=3")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make_scheduler(optimizer, config, 2)  # 4 steps, 3 of them warmup
    optimizer.step()
    scheduler.step()
    assert lengthen(scheduler, 8) == (1, pytest.approx(LR / 2), pytest.approx(LR / 2))
    rates = []
    for _ in range(7):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [LR * 2 / 4, LR * 3 / 4] + [LR * (1 + math.cos(math.pi * i / 5)) / 2 for i in range(5)]
    assert rates == pytest.approx(expected, rel=1e-9)


def test_a_per_epoch_cosine_holds_each_epochs_rate_as_iqa_pytorch_steps_it_and_lengthens_in_epochs():
    from temu_dist.resume import extend_schedule

    config = tiny_config(f"train.lr={LR}", "train.epochs=4", "train.lr_schedule=epoch")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make_scheduler(optimizer, config, 3)
    rates = []
    for epoch in range(4):
        epoch_schedule(scheduler, epoch)
        epoch_schedule(scheduler, epoch)  # again, as a resume within the epoch does: it stays
        for _ in range(3):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
    assert rates == pytest.approx([LR * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4) for _ in range(3)],
                                  rel=1e-9)
    # Finished, extended to 8 epochs: it goes on at epoch 4 of an 8-epoch cosine, after its 12 steps.
    assert extend_schedule(scheduler, 4, 8, 3, epoch_from=(4, 0)) == {
        "epochs_from": 4, "epochs_to": 8, "after_step": 12, "lr_from": pytest.approx(0, abs=1e-12),
        "lr_to": pytest.approx(LR / 2, rel=1e-9)}
    epoch_schedule(scheduler, 4)
    assert scheduler.get_last_lr()[0] == pytest.approx(LR / 2, rel=1e-9)
    epoch_schedule(scheduler, 6)
    assert scheduler.get_last_lr()[0] == pytest.approx(LR * (1 + math.cos(math.pi * 6 / 8)) / 2, rel=1e-9)
    with pytest.raises(ConfigError, match=r"train: .*warmup_steps 3 climbs a step at a time, and lr_schedule epoch "
                                          r"steps the rate once an epoch: leave warmup_steps at 0 with it"):
        tiny_config("train.lr_schedule=epoch", "train.warmup_steps=3")


def test_adamw_says_when_weight_decay_has_no_matrix_to_decay():
    config = tiny_config("model.prompt=none", "train.optimizer=adamw", "train.weight_decay=0.1")
    with pytest.warns(Notice, match=r"^train.weight_decay 0.1 decays nothing: AdamW leaves vectors out of it, and "
                                    r"model.prompt=none trains no matrix$"):
        make_optimizer(build_model(config), config)
