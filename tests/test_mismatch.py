"""check_mismatch and recalibrate on real small models, against values computed here."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe import store
from bnprobe.mismatch import check_mismatch, recalibrate

EPS = 1e-5


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(12, 10),
        nn.BatchNorm1d(10),
        nn.ReLU(),
        nn.Linear(10, 4),
    )


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout2d(0.3)
        self.conv3 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(6)  # left in eval mode on purpose in some tests
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu_(self.bn1(self.conv1(x)))  # in-place after BN, on purpose
        x = self.drop(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean(dim=(2, 3)))


def warm_up(model: nn.Module, make: callable, steps: int = 3) -> None:  # type: ignore[valid-type]
    """A few training-mode forwards so that running stats are real but not exact."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(make())


def snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "track": [m.track_running_stats for m in model.modules() if isinstance(m, _BatchNorm)],
        "momentum": [m.momentum for m in model.modules() if isinstance(m, _BatchNorm)],
        "rng": torch.get_rng_state(),
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(model)
    state_b = before["state"]
    assert isinstance(state_b, dict)
    for k, v in after["state"].items():  # type: ignore[attr-defined]
        assert torch.equal(v, state_b[k]), k
        assert v.dtype == state_b[k].dtype
    assert after["ids"] == before["ids"]
    for key in ("training", "track", "momentum", "hooks"):
        assert after[key] == before[key], key
    assert torch.equal(after["rng"], before["rng"])  # type: ignore[arg-type]


def bn_inputs_eval(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of every BN layer in a plain eval forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, a[0].clone()))
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm)
    ]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def fit_exactly(model: nn.Module, x: torch.Tensor) -> None:
    """Set each layer's running stats to the batch moments of its eval-mode input, in order."""
    for name, bn in model.named_modules():
        if not isinstance(bn, _BatchNorm):
            continue
        inp = bn_inputs_eval(model, x)[name]
        dims = [0, *range(2, inp.dim())]
        bn.running_mean.copy_(inp.mean(dims))  # type: ignore[union-attr]
        bn.running_var.copy_(inp.var(dims, unbiased=False))  # type: ignore[union-attr]


def values(df: pd.DataFrame, metric: str) -> dict[str, float]:
    sub = df[df["metric"] == metric]
    return dict(zip(sub["layer"], sub["value"], strict=True))


# --------------------------------------------------------------------------- check_mismatch


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_probe_leaves_model_bit_identical(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        model: nn.Module = mlp()
        make = lambda: torch.randn(16, 6) * 2 + 1  # noqa: E731
    else:
        model = ConvNet()
        make = lambda: torch.randn(8, 3, 6, 6) + 0.5  # noqa: E731
    warm_up(model, make)
    model.train()
    if kind == "conv":
        model.bn3.eval()  # type: ignore[union-attr]  # frozen layer left in eval on purpose
    x = make()
    before = snapshot(model)
    df = check_mismatch(model, x)
    assert_unchanged(model, before)
    assert list(df.columns) == list(store.COLUMNS)
    assert set(df["stage"]) == {"probe"}
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert list(values(df, "local_gap")) == bns
    assert list(values(df, "output_gap")) == bns
    assert set(values(df, "logits_gap")) == {store.MODEL}
    # Warm-up stats are 3 momentum steps from init: far from the batch, so gaps are clearly > 0;
    # a frozen layer (eval mode while the model trains) behaves the same in both passes.
    local = values(df, "local_gap")
    frozen = {"bn3"} if kind == "conv" else set()
    assert min(v for n, v in local.items() if n not in frozen) > 0.05
    assert all(local[n] == 0.0 for n in frozen)
    agree = values(df, "pred_agreement")[store.MODEL]
    assert 0.0 <= agree <= 1.0


def test_probe_is_deterministic_and_independent_of_dropout_and_model_mode() -> None:
    torch.manual_seed(1)
    model = ConvNet()
    warm_up(model, lambda: torch.randn(8, 3, 6, 6))
    x = torch.randn(8, 3, 6, 6)
    model.train()
    a = check_mismatch(model, x)
    model.eval()
    b = check_mismatch(model, (x, torch.zeros(8)))  # (input, target) batch
    pd.testing.assert_frame_equal(a, b)


def test_fitted_exactly_gives_zero_gaps() -> None:
    torch.manual_seed(2)
    model = ConvNet()
    warm_up(model, lambda: torch.randn(8, 3, 6, 6))
    x = torch.randn(8, 3, 6, 6) * 1.5 - 0.3
    fit_exactly(model, x)
    df = check_mismatch(model, x)
    for metric in ("local_gap", "output_gap", "logits_gap"):
        for layer, v in values(df, metric).items():
            assert v < 1e-5, (metric, layer, v)
    assert values(df, "pred_agreement")[store.MODEL] == 1.0


@pytest.mark.parametrize("culprit", ["1", "5"])
def test_corrupted_layer_is_blamed_by_local_gap(culprit: str) -> None:
    torch.manual_seed(3)
    model = mlp()
    x = torch.randn(64, 6) * 3 + 2
    fit_exactly(model, x)
    bn = model.get_submodule(culprit)
    with torch.no_grad():
        bn.running_mean.add_(2.0 * bn.running_var.sqrt())  # type: ignore[operator,union-attr]
    df = check_mismatch(model, x)
    local = values(df, "local_gap")
    output = values(df, "output_gap")
    assert max(local, key=local.__getitem__) == culprit
    assert local[culprit] > 0.5
    for layer, v in local.items():
        if layer != culprit:
            assert v < 1e-5, (layer, v)  # before AND after the culprit: train-pass inputs
    names = list(local)
    for layer in names[: names.index(culprit)]:
        assert output[layer] < 1e-5
    assert output[culprit] > 0.5
    assert values(df, "logits_gap")[store.MODEL] > 0.01


def test_local_gap_matches_closed_form() -> None:
    torch.manual_seed(4)
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5))  # type: ignore[union-attr]
        bn.running_var.copy_(torch.rand(5) + 0.5)  # type: ignore[union-attr]
        bn.weight.copy_(torch.rand(5) + 0.5)
        bn.bias.copy_(torch.randn(5))
    model = nn.Sequential(bn)
    x = torch.randn(32, 5, dtype=torch.float64).float()
    xd = x.double()
    w, b = bn.weight.double(), bn.bias.double()
    yb = (xd - xd.mean(0)) / (xd.var(0, unbiased=False) + EPS).sqrt() * w + b
    rm, rv = bn.running_mean.double(), bn.running_var.double()  # type: ignore[union-attr]
    yr = (xd - rm) / (rv + EPS).sqrt() * w + b
    expected = ((yb - yr).norm() / yb.norm()).item()
    df = check_mismatch(model, x)
    assert values(df, "local_gap")["0"] == pytest.approx(expected, rel=1e-5)
    assert values(df, "output_gap")["0"] == pytest.approx(expected, rel=1e-5)
    assert values(df, "logits_gap")[store.MODEL] == pytest.approx(expected, rel=1e-5)


def test_layers_without_running_stats_are_skipped_and_selection_works() -> None:
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.BatchNorm1d(6)
    )
    df = check_mismatch(model, torch.randn(10, 4))
    assert set(df["layer"]) == {"2", store.MODEL}
    df = check_mismatch(model, torch.randn(10, 4), layers=["2"], step=7, epoch=2, rank=1)
    assert set(df["layer"]) == {"2", store.MODEL}
    assert set(df["step"]) == {7} and set(df["epoch"]) == {2} and set(df["rank"]) == {1}


def test_probe_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer in the model; check_mismatch"):
        check_mismatch(nn.Linear(3, 2), torch.randn(4, 3))
    model = mlp()
    bad = torch.randn(4, 7)
    before = snapshot(model)  # after every random draw of the test itself
    with pytest.raises(ValueError, match=r"could not run the model.*shape=\(4, 7\).*input tensor"):
        check_mismatch(model, bad)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="taken as \\(input, target"):
        check_mismatch(model, [bad, torch.zeros(4)])
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- recalibrate


def batch_moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, h.dim())]
    return h.mean(dims), h.var(dims, unbiased=False)


def test_recalibrate_reproduces_population_moments_mlp() -> None:
    torch.manual_seed(5)
    model = mlp()
    warm_up(model, lambda: torch.randn(16, 6))
    model.train()
    sizes = [10, 7, 13, 3]
    data = [(torch.randn(n, 6) * 2 + 1, torch.zeros(n)) for n in sizes]
    df = recalibrate(model, data, progress=False)

    # Layer "1": its input is Linear(x) whatever the modes: moments of the concatenated data.
    lin1, bn1, lin2, bn5 = model[0], model[1], model[4], model[5]
    with torch.no_grad():
        h1 = [lin1(x).double() for x, _ in data]
        all1 = torch.cat(h1)
        torch.testing.assert_close(bn1.running_mean.double(), all1.mean(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(bn1.running_var.double(), all1.var(0), rtol=1e-5, atol=1e-6)
        # Layer "5": each batch normalized by its own batch moments (train-mode BN), dropout off.
        h2 = []
        for h in h1:
            m, v = batch_moments(h)
            z = (h - m) / (v + EPS).sqrt() * bn1.weight.double() + bn1.bias.double()
            h2.append(nn.functional.linear(torch.relu(z), lin2.weight.double(), lin2.bias.double()))
        all2 = torch.cat(h2)
        torch.testing.assert_close(bn5.running_mean.double(), all2.mean(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(bn5.running_var.double(), all2.var(0), rtol=1e-5, atol=1e-6)

    assert set(df["stage"]) == {"recalibrate"}
    samples = values(df, "samples")
    assert samples == {"1": float(sum(sizes)), "5": float(sum(sizes))}
    for layer in ("1", "5"):
        row = df[df["layer"] == layer].set_index("metric")["value"]
        assert row["mean_shift_before"] > 0.1
        assert row["mean_shift_max_before"] >= row["mean_shift_before"]
        assert row["mean_shift_after"] < 1e-5
        # running_var is the unbiased variance: v_after = log(N/(N-1)) up to eps.
        assert row["var_shift_after"] == pytest.approx(math.log(33 / 32), rel=1e-2)


def test_recalibrate_conv_pooled_over_spatial_positions() -> None:
    torch.manual_seed(6)
    model = ConvNet()
    model.train()
    model.bn3.eval()
    data = [torch.randn(n, 3, 5, 5) * 0.7 + 0.2 for n in (4, 9, 2)]
    flags = [m.training for m in model.modules()]
    nbt = [m.num_batches_tracked.clone() for m in model.modules() if isinstance(m, _BatchNorm)]
    recalibrate(model, iter(data), progress=False)
    assert [m.training for m in model.modules()] == flags
    for m, n in zip([m for m in model.modules() if isinstance(m, _BatchNorm)], nbt, strict=True):
        assert torch.equal(m.num_batches_tracked, n)
        assert m.track_running_stats
        assert not m._forward_pre_hooks
    with torch.no_grad():
        h = torch.cat([model.conv1(x) for x in data]).double()
    dims = [0, 2, 3]
    torch.testing.assert_close(model.bn1.running_mean.double(), h.mean(dims), rtol=0, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var.double(), h.var(dims), rtol=1e-5, atol=1e-6)


def test_recalibrate_num_batches_and_apply_false() -> None:
    torch.manual_seed(7)
    model = mlp()
    warm_up(model, lambda: torch.randn(16, 6))
    data = [torch.randn(8, 6) + i for i in range(5)]
    before = snapshot(model)
    dry = recalibrate(model, data, num_batches=2, apply=False, progress=False)
    assert_unchanged(model, before)
    assert values(dry, "samples")["1"] == 16.0
    assert not dry["metric"].str.endswith("_after").any()
    wet = recalibrate(model, data, num_batches=2, progress=False)
    pd.testing.assert_frame_equal(
        wet[wet["metric"].isin(dry["metric"])].reset_index(drop=True), dry
    )
    with torch.no_grad():
        h = model[0](torch.cat(data[:2]))
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=0, atol=1e-5)


def test_recalibrate_errors_are_clear() -> None:
    model = mlp()
    good, bad, no_bn = torch.randn(4, 6), torch.randn(4, 5), nn.Linear(6, 2)
    before = snapshot(model)  # after every random draw of the test itself
    with pytest.raises(ValueError, match="recalibrate got no batches"):
        recalibrate(model, [], progress=False)
    exhausted = iter([good])
    list(exhausted)
    with pytest.raises(ValueError, match="recalibrate got no batches"):
        recalibrate(model, exhausted, progress=False)
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        recalibrate(model, [good], num_batches=0)
    with pytest.raises(ValueError, match="no BatchNorm layer in the model; recalibrate"):
        recalibrate(no_bn, [good])
    with pytest.raises(ValueError, match=r"could not run the model on batch 1.*shape=\(4, 5\)"):
        recalibrate(model, [good, bad], progress=False)
    assert_unchanged(model, before)


def test_demo_net_blame_with_dropout_inplace_relu_and_an_idle_tap() -> None:
    from bnprobe.demo import DemoNet
    from bnprobe.tap import BNTap

    torch.manual_seed(8)
    net = DemoNet(dropout=0.2)  # Dropout2d before each BN, ReLU(inplace=True) after it
    x = torch.randn(6, 3, 28, 28) * 1.3 + 0.4
    fit_exactly(net, x)
    bns = [n for n, m in net.named_modules() if isinstance(m, _BatchNorm)]
    first, second = bns
    with torch.no_grad():
        net.get_submodule(second).running_var.mul_(4.0)  # type: ignore[operator]
    net.train()
    with BNTap(net) as tap:  # attached but inactive, as the callback leaves it around the probe
        before = snapshot(net)
        df = check_mismatch(net, (x, torch.zeros(6)))
        assert_unchanged(net, before)
        assert len(tap.collect(step=0).rows) == 0
    local = values(df, "local_gap")
    assert local[first] < 1e-5
    assert local[second] > 0.3
    assert values(df, "output_gap")[first] < 1e-5


# --------------------------------------------------------------------------- issue 11


def test_fused_bn_act_local_gap_equals_output_gap_at_the_first_layer() -> None:
    """timm's BatchNormAct2d (a BatchNorm2d whose forward also applies ReLU): local_gap uses the
    layer's own forward in both modes, so at the first layer (same input in both passes) it is
    the output gap, activation included."""
    from tests.replicas import FusedNet

    torch.manual_seed(0)
    model = FusedNet()
    warm_up(model, lambda: torch.randn(8, 3, 8, 8) * 2 + 1)
    x = torch.randn(8, 3, 8, 8) * 3 - 1  # shifted and scaled: a real gap
    before = snapshot(model)
    df = check_mismatch(model, x)
    assert_unchanged(model, before)
    local, output = values(df, "local_gap"), values(df, "output_gap")
    assert local["bn1"] > 0.1
    assert local["bn1"] == pytest.approx(output["bn1"], rel=1e-6)
    # the closed form, with the activation: relu(BN_batch(x)) against relu(BN_running(x))
    bn = model.bn1
    h = model.conv1(x).detach()
    y_b = torch.relu(torch.nn.functional.batch_norm(h, None, None, bn.weight, bn.bias, True))
    y_r = torch.relu(
        torch.nn.functional.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    )
    want = float((y_b - y_r).double().norm() / y_b.double().norm())
    assert local["bn1"] == pytest.approx(want, rel=1e-5)


def test_invalid_running_stats_are_counted_on_their_layer_and_never_hidden() -> None:
    """A NaN running mean in one channel and a negative running variance in another of bn2:
    running_invalid = 2 there and 0 elsewhere; bn2's local gap is NaN, not 0."""
    torch.manual_seed(0)
    model = ConvNet()
    warm_up(model, lambda: torch.randn(8, 3, 6, 6))
    with torch.no_grad():
        model.bn2.running_mean[1] = float("nan")
        model.bn2.running_var[3] = -0.5
    x = torch.randn(8, 3, 6, 6)
    bits = {k: v.clone().view(-1).view(torch.uint8) for k, v in model.state_dict().items()}
    df = check_mismatch(model, x)
    after = {k: v.view(-1).view(torch.uint8) for k, v in model.state_dict().items()}
    assert all(torch.equal(bits[k], after[k]) for k in bits)  # NaN included, bit for bit
    invalid = values(df, "running_invalid")
    assert invalid["bn2"] == 2 and invalid["bn1"] == 0
    assert math.isnan(values(df, "local_gap")["bn2"])
    assert math.isfinite(values(df, "local_gap")["bn1"])


def test_standalone_rows_carry_the_update_count_and_warmup() -> None:
    torch.manual_seed(0)
    model = mlp()
    model[5].momentum = None  # cumulative average: r = 0 after the first update
    warm_up(model, lambda: torch.randn(16, 6))  # a few training forwards
    n = int(model[1].num_batches_tracked)
    assert n > 1
    df = check_mismatch(model, torch.randn(16, 6))
    assert (df["step"] == n).all()
    nbt, r = values(df, "num_batches_tracked"), values(df, "warmup_residual")
    assert nbt == {"1": n, "5": n}
    assert r["1"] == pytest.approx(0.9**n) and r["5"] == 0.0
    assert (check_mismatch(model, torch.randn(16, 6), step=7)["step"] == 7).all()


def test_recalibration_gain_is_measured_on_a_copy_of_the_buffers() -> None:
    """Stale running statistics: re-estimating them (what recalibrate would do) moves the
    logits a lot; on statistics fitted to the batch it moves nothing. recal_batches feed the
    re-estimate, and the model is bit-identical afterwards."""
    torch.manual_seed(0)
    model = ConvNet()
    warm_up(model, lambda: torch.randn(8, 3, 6, 6))
    x = torch.randn(16, 3, 6, 6) * 2 + 3
    held = [torch.randn(16, 3, 6, 6) * 2 + 3 for _ in range(3)]
    before = snapshot(model)
    stale = values(check_mismatch(model, x), "recal_logits_shift")[store.MODEL]
    with_held = check_mismatch(model, x, recal_batches=held)
    assert_unchanged(model, before)
    assert stale > 0.2
    shift = values(with_held, "recal_logits_shift")[store.MODEL]
    assert shift > 0.2 and shift != stale
    assert 0 <= values(with_held, "recal_pred_change")[store.MODEL] <= 1
    recalibrate(model, [x, *held], progress=False)
    fitted = values(check_mismatch(model, x, recal_batches=held), "recal_logits_shift")
    assert fitted[store.MODEL] < 1e-5  # the same population: nothing left to gain
