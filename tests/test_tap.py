"""The framework-free core: layer discovery, hooks, and metric values against float64 maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnprobe import stats
from bnprobe.tap import BNTap, find_layers
from tests.reference import INPUT_SHAPES, Reference, make_model, mlp1d

RTOL = 2e-4


def _train_steps(model: nn.Module, tap: BNTap, ref: Reference, shape, steps: int = 6, **kw):
    """Plain SGD loop; every step measured by both the tap and the reference."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for step in range(steps):
        x = torch.randn(kw.get("n", 16), *shape) * (1 + step) + 0.3 * step
        ref.start()
        tap.start()
        loss = model(x).pow(2).mean()
        rows = tap.collect(step=step).rows
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield step, rows, ref.metrics


def _check(rows, expected: dict[str, dict[str, float]]) -> int:
    got = {(r.layer, r.metric): r.value for r in rows.itertuples()}
    checked = 0
    for layer, metrics in expected.items():
        for metric, value in metrics.items():
            assert (layer, metric) in got, f"missing {metric} for {layer}"
            assert got[layer, metric] == pytest.approx(value, rel=RTOL, abs=1e-7), (
                layer,
                metric,
            )
            checked += 1
    return checked


@pytest.mark.parametrize("kind", ["mlp1d", "seq1d", "res2d", "vol3d"])
def test_train_metrics_match_float64_reference(kind: str) -> None:
    model = make_model(kind).train()
    ref = Reference(model)
    with BNTap(model) as tap:
        checked = 0
        for _, rows, expected in _train_steps(model, tap, ref, INPUT_SHAPES[kind]):
            checked += _check(rows, expected)
    ref.remove()
    assert checked >= 6 * 13  # every step, every metric of every layer


@pytest.mark.parametrize(
    "make",
    [
        lambda: mlp1d(affine=False),
        lambda: mlp1d(track=False),
        lambda: mlp1d(momentum=None),  # cumulative average: moments computed directly
        lambda: mlp1d(momentum=0.01),  # small factor: computed directly
        lambda: mlp1d(momentum=1.0),
    ],
    ids=["affine-false", "no-running-stats", "momentum-none", "momentum-0.01", "momentum-1"],
)
def test_layer_variants_match_reference(make) -> None:
    model = make().train()
    ref = Reference(model)
    with BNTap(model) as tap:
        for _, rows, expected in _train_steps(model, tap, ref, (6,)):
            _check(rows, expected)
            metrics = set(rows["metric"])
            bn = model[1]
            assert ("gamma_mean" in metrics) == bn.affine
            assert ("mean_shift" in metrics) == bn.track_running_stats
    ref.remove()


def test_sync_batchnorm_in_one_process_matches_reference() -> None:
    # Across processes SyncBatchNorm needs CUDA; in one process it normalizes like BatchNorm.
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.SyncBatchNorm(6), nn.ReLU()).train()
    ref = Reference(model)
    with BNTap(model) as tap:
        checked = sum(
            _check(rows, exp) for _, rows, exp in _train_steps(model, tap, ref, (3, 6, 6))
        )
    ref.remove()
    assert checked >= 6 * 13


def test_eval_mode_layer_is_measured_against_its_running_stats() -> None:
    model = mlp1d().train()
    model[1].eval()  # a frozen BN inside a training model
    model[1].running_mean.fill_(0.5)
    ref = Reference(model)
    with BNTap(model) as tap:
        for _, rows, expected in _train_steps(model, tap, ref, (6,), steps=2):
            _check(rows, expected)
            got = rows.set_index("metric")["value"]
            assert got["train_mode"] == 0.0 and got["model_train_mode"] == 1.0
    ref.remove()


def test_recovered_moments_are_exact_enough() -> None:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(32, momentum=0.1)
    bn.running_mean.uniform_(-3, 3)
    bn.running_var.uniform_(0.5, 4)
    x = torch.randn(8, 32, 5, 5) * 2 + 1
    old_m, old_v = bn.running_mean.clone(), bn.running_var.clone()
    bn(x)
    host = [t.double().numpy() for t in (old_m, old_v, bn.running_mean, bn.running_var)]
    mean, var = stats.recover_moments(*host, 0.1, 8 * 25)
    want = stats.batch_moments(x)
    torch.testing.assert_close(torch.from_numpy(mean), want.mean, rtol=0, atol=2e-5)
    torch.testing.assert_close(torch.from_numpy(var), want.var, rtol=2e-5, atol=0)


def test_pooled_moments_equal_moments_of_the_concatenation() -> None:
    a, b = torch.randn(7, 4, 3) + 2, torch.randn(5, 4, 3) * 3
    pooled = stats.combine(stats.batch_moments(a), stats.batch_moments(b))
    whole = torch.cat([a, b]).double()
    torch.testing.assert_close(pooled.mean, whole.mean(dim=(0, 2)))
    torch.testing.assert_close(pooled.var, whole.var(dim=(0, 2), unbiased=False))
    assert pooled.n == 36


def test_half_precision_input_is_measured_in_float32() -> None:
    x = (torch.randn(64, 8) * 100 + 1000).bfloat16()
    m = stats.batch_moments(x)
    assert m.mean.dtype == torch.float64 and torch.isfinite(m.var).all()
    torch.testing.assert_close(m.mean, x.double().mean(0), rtol=1e-6, atol=1e-6)


def test_off_steps_record_nothing_and_hooks_are_removed() -> None:
    model = mlp1d().train()
    tap = BNTap(model).attach()
    tap.attach()  # idempotent
    assert not model[1]._forward_hooks and len(model[1]._forward_pre_hooks) == 1  # one hook
    model(torch.randn(8, 6))  # not a measured step
    layer = tap.layers[0]
    assert layer.calls == 0 and layer.layout is None and layer.before is layer.after is None
    tap.detach()
    tap.detach()  # idempotent
    assert not model[1]._forward_hooks and not model[1]._forward_pre_hooks


def test_shared_layer_is_measured_once_and_calls_are_counted() -> None:
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    ref = Reference(model)
    with BNTap(model) as tap:
        ref.start()
        tap.start()
        model(torch.randn(10, 4) + 2)
        rows = tap.collect(step=0).rows
    got = rows.set_index("metric")["value"]
    assert got["forward_calls"] == 2
    assert got["mean_shift"] == pytest.approx(ref.metrics["0"]["mean_shift"], rel=RTOL)


def test_rows_of_a_step_follow_what_changed_since_the_step_before() -> None:
    """The tap reuses the step before's row plan and structure rows while nothing they depend on
    changed: calls, momentum and batch size that change must still show."""
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    seen = []
    with BNTap(model) as tap:
        for step, (forwards, batch, momentum) in enumerate(
            [(1, 8, 0.1), (1, 8, 0.1), (2, 8, 0.1), (1, 8, 0.1), (1, 6, 0.1), (1, 6, 0.3)]
        ):
            bn.momentum = momentum
            tap.start()
            x = torch.randn(batch, 4)
            model(x) if forwards == 2 else bn(x)
            got = tap.collect(step=step).rows.set_index("metric")["value"]
            seen.append((got["forward_calls"], got["batch_size"], got["momentum"]))
    assert seen == [
        (1, 8, 0.1),
        (1, 8, 0.1),
        (2, 8, 0.1),
        (1, 8, 0.1),
        (1, 6, 0.1),
        (1, 6, pytest.approx(0.3)),
    ]


def test_restored_references_replace_the_host_copy_of_the_old_ones() -> None:
    """gamma_0 is kept on the host between steps; a restored one (a resumed run) is used from
    the next step on: gamma_drift = ||gamma - gamma_0|| / ||gamma_0||."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x = torch.randn(8, 4)
    drifts = []
    with BNTap(model) as tap:
        for step in range(3):
            if step == 2:
                refs = tap.references()
                refs["1"]["gamma0"] = refs["1"]["gamma0"] + 1.0  # gamma = 1, gamma_0 = 2
                tap.load_references(refs)
            tap.start()
            model(x)
            drifts.append(tap.collect(step=step).rows.set_index("metric")["value"]["gamma_drift"])
    assert drifts == [0.0, 0.0, pytest.approx(0.5, rel=1e-12)]


def test_structure_rows_name_batch_size_and_eps() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3))
    with BNTap(model) as tap:
        tap.start()
        model(torch.randn(5, 3, 2, 3))
        got = tap.collect(step=0).rows.set_index("metric")["value"]
    assert got["batch_size"] == 5 and got["samples_per_channel"] == 30
    assert got["eps"] == pytest.approx(1e-3)


def test_collapsed_channels_count_in_var_small_frac() -> None:
    bn = nn.BatchNorm1d(4)
    x = torch.randn(16, 4)
    x[:, :3] = 2.0  # three constant channels
    with BNTap(bn) as tap:
        tap.start()
        bn(x)
        got = tap.collect(step=0).rows.set_index("metric")["value"]
    assert got["var_small_frac"] == 0.75


def test_unused_layer_reports_zero_calls() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.spare = nn.BatchNorm1d(4)  # defined, never called

        def forward(self, x):
            return self.bn(x)

    model = Net()
    with BNTap(model) as tap:
        tap.start()
        model(torch.randn(5, 4))
        rows = tap.collect(step=0).rows
    spare = rows[rows["layer"] == "spare"]
    assert list(spare["metric"]) == ["forward_calls"] and spare["value"].iloc[0] == 0


def test_trace_finds_bias_and_dropout_before_bn() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4),  # bias=True, straight into BN
        nn.BatchNorm1d(4),
        nn.Dropout(0.3),
        nn.BatchNorm1d(4),
        nn.Linear(4, 4, bias=False),
        nn.BatchNorm1d(4),
    )
    with BNTap(model) as tap:
        tap.start(trace=True)
        model(torch.randn(6, 3))
        rows = tap.collect(step=0).rows.set_index(["layer", "metric"])["value"]
    assert rows["1", "input_bias"] == 1 and rows["1", "input_dropout"] == 0
    assert rows["3", "input_bias"] == 0 and rows["3", "input_dropout"] == pytest.approx(0.3)
    assert rows["5", "input_bias"] == 0 and rows["5", "input_dropout"] == 0


def test_per_channel_rows_average_to_the_layer_rows() -> None:
    model = make_model("res2d").train()
    with BNTap(model, per_channel=True) as tap:
        tap.start()
        model(torch.randn(4, 3, 8, 8) * 3)
        snap = tap.collect(step=0)
    rows = snap.rows
    chan = rows[rows["channel"].notna()]
    layer_rows = rows[rows["channel"].isna()].set_index(["layer", "metric"])["value"]
    assert set(chan["metric"]) == {
        "batch_mean", "batch_var", "running_mean", "running_var",
        "mean_shift", "var_shift", "kl", "gamma", "beta",
    }  # fmt: skip
    means = chan.groupby(["layer", "metric"])["value"].mean()
    for (layer, metric), value in means.items():
        if metric in layer_rows.index.get_level_values(1):
            assert value == pytest.approx(layer_rows[layer, metric], rel=1e-9)
    assert snap.channels["bn1"]["d"].shape == (8,)


def test_lazy_layer_is_measured_once_initialized() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.LazyBatchNorm1d())
    with BNTap(model) as tap:
        tap.start()
        model(torch.randn(6, 3))
        rows = tap.collect(step=0).rows.set_index("metric")["value"]
    assert rows["samples_per_channel"] == 6 and rows["gamma_drift"] == 0
    assert math.isfinite(rows["mean_shift"])


def test_find_layers_selection() -> None:
    model = make_model("res2d")
    assert list(find_layers(model)) == ["bn0", "bn1"]
    assert list(find_layers(model, "bn1")) == ["bn1"]
    assert list(find_layers(model, ["bn*"])) == ["bn0", "bn1"]
    assert list(find_layers(model, lambda name, m: name.endswith("0"))) == ["bn0"]
    sync = nn.Sequential(nn.SyncBatchNorm(3), nn.LazyBatchNorm2d())
    assert list(find_layers(sync)) == ["0", "1"]
    with pytest.raises(ValueError, match=r"layers='conv\*' matches no BatchNorm layer.*bn0, bn1"):
        find_layers(model, "conv*")


def test_a_failing_layer_warns_once_and_training_goes_on() -> None:
    class OddBN(nn.BatchNorm1d):
        def forward(self, x):  # an unusual subclass: returns a tuple and takes a dict input
            return super().forward(x["x"]), None

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.odd = OddBN(4)
            self.ok = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.ok(self.odd({"x": x})[0])

    model = Net()
    with BNTap(model) as tap:
        tap.start()
        with pytest.warns(RuntimeWarning, match="measuring layer 'odd' .*OddBN.* failed"):
            model(torch.randn(5, 4))
        rows = tap.collect(step=0).rows
        tap.start()
        model(torch.randn(5, 4))  # no second warning: the layer is off
        again = tap.collect(step=1).rows
    assert set(rows["layer"]) == {"ok"} and set(again["layer"]) == {"ok"}
    assert len(tap.failures) == 1


def test_trace_finds_producers_wrapped_in_containers() -> None:
    """Sequential(conv, Dropout(0.3)) and Sequential(biased conv) feeding BN layers: the
    container returns its child's tensor, and the child stays the producer. A leaf that
    returns its input's tensor (ReLU(inplace=True)) is the producer of what follows it."""
    from tests.replicas import WrappedDropoutNet

    net = WrappedDropoutNet().train()
    relu = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.ReLU(inplace=True), nn.BatchNorm2d(4))
    for model, x in ((net, torch.randn(4, 3, 8, 8)), (relu, torch.randn(2, 3, 6, 6))):
        with BNTap(model) as tap:
            tap.start(trace=True)
            model(x)
            rows = tap.collect(step=0).rows.set_index(["layer", "metric"])["value"]
        if model is net:
            assert rows["bn1", "input_dropout"] == pytest.approx(0.3)
            assert rows["bn1", "input_bias"] == 0
            assert rows["bn2", "input_bias"] == 1 and rows["bn2", "input_dropout"] == 0
        else:
            assert rows["2", "input_bias"] == 0  # a ReLU, not the biased conv, feeds the BN


@pytest.mark.parametrize("momentum", [0.05, 0.1, 0.5])
def test_recovery_error_bound_holds_on_real_updates(momentum) -> None:
    """A real BN update in float32, recovered in float64: the error of mu_B and var_B stays
    within stats.recovery_bounds, even for channels whose variance is 1e-9 of the running one
    or exactly 0 (reported as 0, never negative)."""
    torch.manual_seed(0)
    c = 64
    bn = nn.BatchNorm1d(c, momentum=momentum)
    scale = torch.logspace(-5, 2, c)
    scale[:4] = 0.0  # constant channels: var_B exactly 0
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c) * 100)
        bn.running_var.copy_(torch.rand(c) * 1000 + 1)
        x = torch.randn(32, c) * scale + torch.randn(c) * 10
        old_m, old_v = bn.running_mean.double(), bn.running_var.double()
        bn(x)
    new_m, new_v = bn.running_mean.double(), bn.running_var.double()
    mean, var = stats.recover_moments(
        old_m.numpy(), old_v.numpy(), new_m.numpy(), new_v.numpy(), momentum, 32
    )
    xd = x.double()
    true_m, true_v = xd.mean(0).numpy(), xd.var(0, unbiased=False).numpy()
    err_m, err_v = stats.recovery_bounds(old_m.numpy(), old_v.numpy(), true_m, true_v, momentum, 32)
    assert (abs(mean - true_m) <= err_m + 1e-6 * abs(true_m)).all()
    assert (abs(var - true_v) <= err_v + 1e-6 * true_v).all()
    assert (var >= 0).all() and (var[:4] == 0).all()
    ill = stats.recovery_ill_conditioned(old_m.numpy(), old_v.numpy(), true_m, true_v, momentum, 32)
    assert ill[:8].all()  # dead and tiny channels are ill-conditioned
    if momentum == 0.5:
        assert not ill[-8:].any()  # large ones, at a large factor, are not


def test_warmup_metrics_follow_the_update_count_for_cumulative_and_momentum_layers() -> None:
    """momentum=None (cumulative average): r = 1 before the first update, 0 after; momentum
    0.1: r = 0.9**n. The excess shifts are 0 while r = 1 and equal the plain shifts at r = 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(5, momentum=None), nn.BatchNorm1d(5, momentum=0.1))
    got = []
    with BNTap(model) as tap:
        for step in range(3):
            tap.start()
            model(torch.randn(16, 5) * 3 + 2)
            got.append(tap.collect(step=step).rows.set_index(["layer", "metric"])["value"])
    assert [g["0", "num_batches_tracked"] for g in got] == [0, 1, 2]
    assert [g["0", "warmup_residual"] for g in got] == [1.0, 0.0, 0.0]
    assert [g["1", "warmup_residual"] for g in got] == pytest.approx([1.0, 0.9, 0.81])
    assert got[0]["0", "var_shift_excess"] == 0 and got[0]["0", "mean_shift"] > 0.5
    for g in got[1:]:
        assert g["0", "mean_shift_excess"] == pytest.approx(g["0", "mean_shift"], rel=1e-12)
        assert g["0", "var_shift_excess_max"] == pytest.approx(g["0", "var_shift_max"], rel=1e-12)
    assert all(g[layer, "running_invalid"] == 0 for g in got for layer in ("0", "1"))


def test_snapshot_parts_are_rows_and_a_table_given_to_it_keeps_its_rows_and_order() -> None:
    """Callers outside the tap (rank gathering, the probe) hand tables to Snapshot and Store:
    they become Rows at the door, one per run of step/epoch/stage/rank/channel-NA, in order."""
    import numpy as np
    import pandas as pd

    from bnprobe.store import Rows, Store, concat, make_rows
    from bnprobe.tap import Snapshot

    model = make_model("res2d").train()
    with BNTap(model, per_channel=True) as tap:
        tap.start()
        model(torch.randn(4, 3, 8, 8))
        own = tap.collect(step=3, epoch=1)
    common = {"step": 3, "epoch": 1, "stage": "train"}
    table = concat(
        [
            make_rows(**common, rank=1, layers=["bn1", "bn1"], metrics=["kl", "d"], values=[1, 2]),
            make_rows(**common, rank=1, layers=["bn1"], metrics=["kl"], values=[3], channels=[5]),
            make_rows(**common, rank=2, layers=["bn1"], metrics=["kl"], values=[4]),
            make_rows(**common, rank=0, layers=["bn1"], metrics=["rank_divergence"], values=[5]),
        ]
    )
    snap = Snapshot([*own.parts, table], own.channels)
    assert all(isinstance(p, Rows) for p in snap.parts)
    assert len(snap.parts) == len(own.parts) + 4
    assert [p.rank for p in snap.parts[-4:]] == [1, 1, 2, 0]
    assert snap.parts[-3].channels is not None and list(snap.parts[-3].channels) == [5]
    pd.testing.assert_frame_equal(snap.rows, concat([own.rows, table]), check_exact=True)
    assert own.aggregates is own.parts[0] and snap.aggregates is None  # several layer parts
    alone = Snapshot([table.iloc[:2]])
    assert alone.aggregates is alone.parts[0] and alone.aggregates.metrics == ["kl", "d"]
    assert Snapshot([table.iloc[:0]]).parts == [] and len(Snapshot([]).rows) == 0
    by_rows, by_table = Store(), Store()
    for part in snap.parts:
        by_rows.append(part)
    by_table.append(snap.rows)
    pd.testing.assert_frame_equal(by_rows.to_dataframe(), by_table.to_dataframe())
    assert np.array_equal(by_table.to_dataframe()["value"][-5:], [1, 2, 3, 4, 5])


def test_traced_step_leaves_no_global_hook_and_pooled_step_counts_no_calls() -> None:
    from torch.nn.modules.module import _global_forward_hooks

    before = len(_global_forward_hooks)
    model = make_model("res2d").train()
    with BNTap(model) as tap:
        tap.start(trace=True)
        model(torch.randn(4, 3, 8, 8))
        assert len(_global_forward_hooks) == before + 1
        tap.collect(step=0)
        assert len(_global_forward_hooks) == before
        tap.start(trace=True)
    assert len(_global_forward_hooks) == before  # detach ends a trace too
    with BNTap(model.eval()) as tap, torch.no_grad():
        tap.start(pool=True)
        model(torch.randn(4, 3, 8, 8))
        model(torch.randn(6, 3, 8, 8))
        assert all(layer.calls == 0 and layer.pooled is not None for layer in tap.layers)
        rows = tap.collect(step=0, stage="val").rows.set_index(["layer", "metric"])["value"]
    assert rows["bn1", "samples_per_channel"] == 10 * 8 * 8
    assert "forward_calls" not in rows.index.get_level_values(1)


class _Mixed(nn.Module):
    """Every kind of layer the start snapshot must hold or leave to the pre-hook: float32 and
    float64 layers (two groups), a layer called twice, a lazy one, one without affine
    parameters, one without running statistics, a cumulative one and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm1d(4)
        self.shared = nn.BatchNorm1d(4)
        self.lazy = nn.LazyBatchNorm1d()
        self.plain = nn.BatchNorm1d(4, affine=False)
        self.untracked = nn.BatchNorm1d(4, track_running_stats=False)
        self.cumulative = nn.BatchNorm1d(4, momentum=None)
        self.frozen = nn.BatchNorm1d(4).eval()
        self.wide = nn.BatchNorm1d(4).double()

    def train(self, mode: bool = True) -> _Mixed:
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(torch.relu(self.shared(self.a(x))))
        x = self.cumulative(self.untracked(self.plain(self.lazy(x))))
        return self.wide(self.frozen(x).double()).float()


def _rows_of(tap: BNTap, model: nn.Module, steps: int) -> list:
    torch.manual_seed(3)
    out = []
    for step in range(steps):
        tap.start()
        model(torch.randn(16, 4) * (1 + step) + step)
        out.append(tap.collect(step=step).parts[0])
    return out


def test_start_snapshot_gives_the_numbers_the_per_layer_copy_gives(monkeypatch) -> None:
    """The snapshot of every layer at the step's first BN forward (one cat per device and dtype)
    and the pre-hook's own copy of each layer (what the tap did before, and still does for what
    the snapshot cannot hold) give the same rows, bit for bit, over recovered steps too."""
    from bnprobe.tap import hooks

    torch.manual_seed(0)
    model = _Mixed().train()
    torch.manual_seed(0)
    twin = _Mixed().train()
    first = torch.randn(16, 4)
    with BNTap(model) as tap:
        tap.start()
        assert all(layer.snapped is None for layer in tap.layers)  # taken at the first forward
        model(first)
        snapped = {layer.name: layer.snapped for layer in tap.layers}
        tap.collect(step=0)
        got = _rows_of(tap, model, 5)
        assert {layer.name for layer in tap.layers if layer.snapped is not None} >= {"a", "wide"}
    assert snapped["lazy"] is None and snapped["a"] is not None  # lazy: the pre-hook copies
    assert snapped["a"].group != snapped["wide"].group  # float32 and float64: two groups
    assert snapped["untracked"] is not None and not snapped["untracked"].running
    monkeypatch.setattr(hooks._SnapshotPlan, "take", lambda plan: [])
    with BNTap(twin) as tap:
        tap.start()
        twin(first)
        tap.collect(step=0)
        want = _rows_of(tap, twin, 5)
        assert all(layer.snapped is None for layer in tap.layers)
    recovered = 0
    for g, w in zip(got, want, strict=True):
        assert list(g.layers) == list(w.layers) and list(g.metrics) == list(w.metrics)
        np.testing.assert_array_equal(g.values, w.values)
        recovered += 1
    assert recovered == 5
    assert not any(layer.suspect for layer in tap.layers if layer.name in ("a", "shared"))


class _Branches(nn.Module):
    """BN layers side by side, each on the first ``width`` columns of the input (so a test can
    change a layer's width between steps), two of them lazy."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm1d(4)
        self.b = nn.BatchNorm1d(4)
        self.plain = nn.BatchNorm1d(4, affine=False)
        self.lazy = nn.LazyBatchNorm1d()
        self.wide = nn.BatchNorm1d(4).double()
        self.lazy_plain = nn.LazyBatchNorm1d(affine=False)  # not called while its width is 0
        self.width = {"a": 4, "b": 4, "plain": 4, "lazy": 3, "wide": 4, "lazy_plain": 0}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name, w in self.width.items():
            if not w:
                continue
            bn = getattr(self, name)
            dtype = bn.weight.dtype if bn.affine else bn.running_var.dtype
            out.append(bn(x[:, :w].to(dtype)))
        return out


def _bitwise(got: object, want: object) -> None:
    if isinstance(got, torch.Tensor):
        assert isinstance(want, torch.Tensor) and got.dtype == want.dtype
        assert torch.equal(got, want)
    elif isinstance(got, (list, tuple)):
        assert isinstance(want, (list, tuple)) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _bitwise(g, w)
    else:
        assert got == want


def test_the_snapshot_plan_kept_between_steps_follows_every_change_of_the_layers() -> None:
    """The snapshot's plan (which tensors, which group, each layer's place) is kept between
    measured steps; every change it depends on, made between steps, gives the snapshot an
    uncached :func:`_snapshot` takes at the same moment, bit for bit."""
    from bnprobe.tap import hooks

    torch.manual_seed(0)
    model = _Branches().train()
    x = torch.randn(8, 6, dtype=torch.float64)
    seen: list[tuple[object, object, object]] = []
    with BNTap(model) as tap:

        def compare(module: nn.Module, args: object) -> None:  # after the tap's pre-hook
            if not tap.active:
                return
            cached = (tap._snapshots, [layer.snapped for layer in tap.layers])
            plan = tap._plan
            with torch.no_grad():
                fresh = hooks._snapshot(tap.layers)
            _bitwise(cached, (fresh, [layer.snapped for layer in tap.layers]))
            seen.append((plan, cached[0], cached[1]))

        model.a.register_forward_pre_hook(compare)  # the first BN forward: the snapshot's
        a, b = model.a, model.b

        def step() -> None:
            tap.start()
            model(x)
            tap.collect(step=len(seen))

        def to_float64(m: nn.BatchNorm1d) -> None:
            for t in (m.running_mean, m.running_var, m.weight, m.bias):
                t.data = t.data.double()

        def wider(m: nn.BatchNorm1d) -> None:  # without gamma_0, beta_0 that must match
            for t in (m.running_mean, m.running_var):
                t.data = torch.rand(6, dtype=t.dtype)
            model.width["plain"] = 6

        def fresh_state(m: nn.BatchNorm1d) -> None:
            state = {k: v.clone() + 1 for k, v in m.state_dict().items()}
            m.load_state_dict(state, assign=True)

        def copied_state(m: nn.BatchNorm1d) -> None:
            m.load_state_dict({k: v.clone() + 1 for k, v in m.state_dict().items()})

        def no_running(m: nn.BatchNorm1d) -> None:
            m.running_mean = None
            m.running_var = None

        changes = [
            ("nothing", lambda: None),
            ("a lazy layer without gamma_0 initializes", lambda: model.width.update(lazy_plain=2)),
            ("it initialized (in place: the same objects)", lambda: None),
            ("load_state_dict in place", lambda: copied_state(a)),
            ("buffer replaced", lambda: setattr(a, "running_mean", torch.zeros(4))),
            ("counter replaced", lambda: setattr(a, "num_batches_tracked", torch.tensor(7))),
            ("counter .data", lambda: setattr(b.num_batches_tracked, "data", torch.tensor(9))),
            ("parameter .data dtype", lambda: to_float64(b)),
            ("module.to(dtype)", lambda: b.float()),
            ("buffer .data shape", lambda: wider(model.plain)),
            ("load_state_dict(assign=True)", lambda: fresh_state(a)),
            ("buffers set to None", lambda: no_running(a)),
            ("whole model .to(dtype)", lambda: model.double()),
            ("nothing", lambda: None),
        ]
        step()  # the lazy layer initializes: left to its pre-hook
        assert tap.layers[3].name == "lazy" and seen[-1][2][3] is None
        step()  # it is in the snapshot now
        assert seen[-1][2][3] is not None and seen[-1][0] is not seen[-2][0]
        for what, change in changes:
            before = seen[-1][0]
            change()
            step()
            plan, _, snapped = seen[-1]
            kept = what in ("nothing", "load_state_dict in place", "counter .data")
            kept |= what.startswith("a lazy layer")  # it initializes after the snapshot
            assert (plan is before) == kept, what  # the same objects of the same shape: kept
            assert not tap.failures, (what, tap.failures)
        assert [s is None for s in snapped] == [False] * 6
        assert len({s.group for s in snapped if s is not None}) == 1  # all float64 now


@pytest.mark.parametrize("blocks", [("running_mean", "running_var"), ("weight", "bias")])
def test_the_snapshot_plan_no_longer_holds_a_layer_whose_blocks_change_dtype(blocks) -> None:
    """A change of the running buffers' dtype only, or of gamma's and beta's only, made with
    ``.data`` (the same objects; a forward would not run in between), moves the layer to
    another group: the kept plan no longer holds, and a new one takes what :func:`_snapshot`
    takes."""
    from bnprobe.tap import hooks

    model = _Branches()
    model(torch.randn(8, 6, dtype=torch.float64))  # the lazy layer initializes
    with BNTap(model) as tap:
        plan = hooks._SnapshotPlan(tap.layers)
        assert plan.holds(tap.layers)
        for name in blocks:
            t = getattr(model.b, name)
            t.data = t.data.double() + 0.5
        assert not plan.holds(tap.layers)
        with torch.no_grad():
            taken = hooks._SnapshotPlan(tap.layers).take()
            snapped = [layer.snapped for layer in tap.layers]
            want = hooks._snapshot(tap.layers)
        _bitwise((taken, snapped), (want, [layer.snapped for layer in tap.layers]))
        assert len(taken) == 3 and snapped[1] is not None and snapped[1].group == 1


def test_shared_and_lazy_layers_match_the_reference_on_recovered_steps() -> None:
    """After the first measured step the moments come from the running-stat update: a layer
    called twice keeps its first update (copied by the second call's pre-hook), and a lazy
    layer, left to its pre-hook at the step that initializes it, is in the snapshot from then
    on."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.ReLU(), bn, nn.LazyBatchNorm1d())
    ref = None
    with BNTap(model) as tap:
        for step in range(4):
            if ref is not None:
                ref.start()
            tap.start()
            model(torch.randn(32, 4) * (1 + step) + 2)
            snapped = [layer.snapped is not None for layer in tap.layers]
            assert snapped == [True, step > 0]  # uninitialized at the first forward's snapshot
            recovered = [layer.layout.recovered for layer in tap.layers]  # type: ignore[union-attr]
            rows = tap.collect(step=step).rows
            assert recovered == [step > 0, step > 0]
            if ref is None:  # the reference reads gamma: only once the lazy layer has one
                ref = Reference(model)
            else:
                assert _check(rows, ref.metrics) >= 2 * 13
    assert ref is not None
    ref.remove()


def test_layout_reused_between_steps_follows_every_change_made_between_them() -> None:
    """The tap reuses a layer's layout while nothing it depends on changed since the last
    measured step. Each change a user can make between steps (momentum, eps, the layer put in
    eval mode and back, a smaller last batch, track_running_stats off, the model alone in eval
    mode, the running statistics removed), made alone and followed by an unchanged step, gives
    the rows a tap that builds every layout afresh gives, bit for bit, and shows in the
    structure rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6))
    twin = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6))
    twin.load_state_dict(model.state_dict())

    def momentum(m: nn.Sequential) -> None:
        m[1].momentum = 0.3

    def eps(m: nn.Sequential) -> None:
        m[3].eps = 1e-3

    def frozen(m: nn.Sequential) -> None:
        m[1].eval()

    def thawed(m: nn.Sequential) -> None:
        m[1].train()

    def untracked(m: nn.Sequential) -> None:
        m[3].track_running_stats = False

    def model_eval(m: nn.Sequential) -> None:
        m.training = False  # the model's own flag only: its BN layers still train

    def no_running(m: nn.Sequential) -> None:
        m[1].running_mean = m[1].running_var = m[1].num_batches_tracked = None

    smaller = "smaller"
    steps = [None, None, None, momentum, None, eps, None, frozen, None, thawed, None, smaller]
    steps += [None, untracked, None, model_eval, None, no_running, None]
    fresh_tap = BNTap(twin).attach()
    reused = 0
    with BNTap(model) as tap:
        previous: list = [None, None]
        for step, change in enumerate(steps):
            if callable(change):
                change(model)
                change(twin)
            x = torch.randn(5 if change == smaller else 16, 4) + step
            for layer in fresh_tap.layers:
                layer.facts = None  # every layout built afresh
            rows = []
            for t, m in ((tap, model), (fresh_tap, twin)):
                t.start()
                m(x)
                rows.append(t.collect(step=step).parts[0])
            layouts = [layer.layout for layer in tap.layers]
            reused += sum(a is b for a, b in zip(layouts, previous, strict=True))
            previous = layouts
            assert layouts == [layer.layout for layer in fresh_tap.layers], step
            got, want = rows
            assert list(got.layers) == list(want.layers) and list(got.metrics) == list(want.metrics)
            np.testing.assert_array_equal(got.values, want.values)
            cells = zip(got.layers, got.metrics, got.values, strict=True)
            table = {(la, me): v for la, me, v in cells}
            if change is momentum:
                assert table["1", "momentum"] == pytest.approx(0.3)
            if change is eps:
                assert table["3", "eps"] == pytest.approx(1e-3)
            if change is frozen:
                assert table["1", "train_mode"] == 0 and tap.frozen_layers() == ["1"]
            if change is thawed:
                assert table["1", "train_mode"] == 1 and tap.frozen_layers() == []
            if change == smaller:
                assert table["1", "batch_size"] == 5 and table["3", "samples_per_channel"] == 5
            if change is untracked:
                assert table["3", "has_running_stats"] == 0
                assert not tap.layers[1].layout.recoverable  # type: ignore[union-attr]
            if change is model_eval:
                assert table["1", "model_train_mode"] == 0 and table["1", "train_mode"] == 1
            if change is no_running:
                assert not tap.layers[0].layout.running  # type: ignore[union-attr]
                assert ("1", "running_mean") not in table
    fresh_tap.detach()
    assert reused >= 10  # the unchanged steps reuse the layouts
