"""The lr schedule (warmup, multistep, cosine) and the optimizer's parameter groups."""

import copy
import math

import pytest
import torch
from torch import nn

from detkit.config import SolverConfig
from detkit.engine.lr_schedule import build_lr_scheduler, build_optimizer, build_param_groups, lr_factor
from detkit.errors import ConfigError


def _lrs_over(scheduler, optimizer, n):
    """The lr each of the first n optimizer steps uses (step k uses the lr before scheduler.step)."""
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _one_param_optimizer(lr):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)


def test_linear_warmup_then_multistep_values():
    solver = SolverConfig(base_lr=0.02, max_iter=100, steps=(60, 80), gamma=0.1, warmup_iters=10, warmup_factor=0.001)
    opt = _one_param_optimizer(solver.base_lr)
    sched = build_lr_scheduler(opt, solver)
    lrs = _lrs_over(sched, opt, 100)
    # it=0: 0.02 * 0.001; it=5: 0.02 * (0.001 * 0.5 + 0.5); it=10..59: 0.02; 60..79: 0.002; 80..: 0.0002
    assert lrs[0] == pytest.approx(2e-5, rel=1e-12)
    assert lrs[5] == pytest.approx(0.02 * 0.5005, rel=1e-12)
    assert lrs[9] == pytest.approx(0.02 * (0.001 * 0.1 + 0.9), rel=1e-12)
    assert lrs[10] == pytest.approx(0.02) and lrs[59] == pytest.approx(0.02)
    assert lrs[60] == pytest.approx(0.002) and lrs[79] == pytest.approx(0.002)
    assert lrs[80] == pytest.approx(0.0002) and lrs[99] == pytest.approx(0.0002)


def test_constant_warmup():
    assert lr_factor(0, max_iter=10, warmup_iters=4, warmup_factor=0.25, warmup_method="constant") == 0.25
    assert lr_factor(3, max_iter=10, warmup_iters=4, warmup_factor=0.25, warmup_method="constant") == 0.25
    assert lr_factor(4, max_iter=10, warmup_iters=4, warmup_factor=0.25, warmup_method="constant") == 1.0


def test_cosine_values_and_warmup_multiplies_cosine():
    kw = dict(max_iter=100, scheduler="cosine", warmup_iters=0)
    assert lr_factor(0, **kw) == 1.0
    assert lr_factor(50, **kw) == pytest.approx(0.5)
    assert lr_factor(25, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, **kw) == pytest.approx(0.0, abs=1e-12)
    warm = lr_factor(5, max_iter=100, scheduler="cosine", warmup_iters=10, warmup_factor=0.1)
    assert warm == pytest.approx((0.1 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 5 / 100)))


def test_scheduler_scales_every_group_by_its_own_base_lr():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    solver = SolverConfig(base_lr=0.1, bias_lr_factor=2.0, max_iter=10, steps=(5,), warmup_iters=0)
    opt = build_optimizer(model, solver)
    sched = build_lr_scheduler(opt, solver)
    before = {g["name"]: g["lr"] for g in opt.param_groups}
    assert before == {"weight": 0.1, "bias": 0.2, "norm": 0.1}
    for _ in range(5):
        opt.step()
        sched.step()
    after = {g["name"]: g["lr"] for g in opt.param_groups}
    assert after == pytest.approx({"weight": 0.01, "bias": 0.02, "norm": 0.01})


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_norms_and_configurable_bias_decay():
    net = _Net()
    groups = build_param_groups(net, base_lr=0.02, weight_decay=1e-4, weight_decay_norm=0.0, weight_decay_bias=0.0)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(net.conv.weight)] == 1e-4 and decay_of[id(net.fc.weight)] == 1e-4
    for p in (net.bn.weight, net.bn.bias, net.gn.weight, net.gn.bias):
        assert decay_of[id(p)] == 0.0
    assert decay_of[id(net.conv.bias)] == 0.0 and decay_of[id(net.fc.bias)] == 0.0
    # Frozen parameters are not given to the optimizer at all.
    assert id(net.frozen.weight) not in decay_of and id(net.frozen.bias) not in decay_of
    assert len(decay_of) == 8

    # weight_decay_bias None: biases decay like weights.
    groups = build_param_groups(net, base_lr=0.02, weight_decay=1e-4)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(net.conv.bias)] == 1e-4 and decay_of[id(net.bn.bias)] == 0.0


def test_norm_weight_decay_is_really_not_applied_by_sgd():
    net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    opt = build_optimizer(net, SolverConfig(base_lr=0.5, momentum=0.0, weight_decay=0.1, max_iter=1))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    ln_w, lin_w = net[1].weight.detach().clone(), net[0].weight.detach().clone()
    opt.step()
    assert torch.equal(net[1].weight, ln_w)  # zero grad, no decay: unchanged
    assert torch.allclose(net[0].weight, lin_w * (1 - 0.5 * 0.1))


def test_bad_scheduler_name_is_a_config_error():
    with pytest.raises(ConfigError, match="lr_scheduler"):
        lr_factor(0, max_iter=10, scheduler="poly")


def test_scheduler_state_dict_loads_with_weights_only(tmp_path):
    solver = SolverConfig(base_lr=0.02, max_iter=100, steps=(60, 80), warmup_iters=10)
    opt = _one_param_optimizer(solver.base_lr)
    sched = build_lr_scheduler(opt, solver)
    _lrs_over(sched, opt, 7)
    torch.save(sched.state_dict(), tmp_path / "s.pth")
    state = torch.load(tmp_path / "s.pth", weights_only=True)
    assert state["last_epoch"] == 7 and state["steps"] == [60, 80]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_is_fused_on_cpu_and_matches_the_reference_update(optimizer):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4))
    ref = copy.deepcopy(net)
    solver = SolverConfig(optimizer=optimizer, base_lr=0.01, weight_decay=1e-2, max_iter=3)
    opt = build_optimizer(net, solver)
    assert all(g["fused"] for g in opt.param_groups)  # torch >= 2.4 has CPU kernels for both
    groups = build_param_groups(ref, base_lr=0.01, weight_decay=1e-2)
    ref_opt = (
        torch.optim.AdamW(groups, lr=0.01, foreach=False)
        if optimizer == "adamw"
        else torch.optim.SGD(groups, lr=0.01, momentum=solver.momentum, foreach=False)
    )
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).pow(2).sum().backward()
            o.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, torch.zeros_like(p))
