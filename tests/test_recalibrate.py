"""recalibrate as users migrating from fvcore / update_bn meet it: frozen layers, precision,
structured batches, the variance convention, short loaders, ranks and SWA.

Every expectation is computed here in float64 from the layers' own inputs, never from bnprobe.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bnprobe.mismatch import check_mismatch, recalibrate
from tests.launch import launch_ranks

ROOT = Path(__file__).resolve().parents[1]


class Backbone(nn.Module):
    """conv-BN-ReLU twice, then a head: a fine-tuning set-up when ``bn1`` is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def pretrained_backbone() -> Backbone:
    torch.manual_seed(0)
    model = Backbone()
    with torch.no_grad():  # "pretrained" statistics, unlike the fine-tuning data's
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model


def bn_eval(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """Eval-mode BN in float64, from the layer's buffers and parameters."""
    shape = (1, -1, *([1] * (x.dim() - 2)))
    mean, var = bn.running_mean.double().view(shape), bn.running_var.double().view(shape)
    w, b = bn.weight.double().view(shape), bn.bias.double().view(shape)
    return (x - mean) / (var + bn.eps).sqrt() * w + b


def bn_batch(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *([1] * (x.dim() - 2)))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / (var + bn.eps).sqrt() * bn.weight.double().view(
        shape
    ) + bn.bias.double().view(shape)


def moments(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dims = [0, *range(2, h.dim())]
    n = h.numel() // h.shape[1]
    return h.mean(dims), h.var(dims, unbiased=True), torch.tensor(float(n))


def test_frozen_layers_keep_their_statistics_and_normalize_with_them() -> None:
    model = pretrained_backbone()
    model.train()
    model.bn1.eval()  # frozen, as in fine-tuning
    data = [torch.randn(n, 3, 6, 6) * 1.5 + 0.3 for n in (5, 3, 8)]
    frozen_before = (model.bn1.running_mean.clone(), model.bn1.running_var.clone())

    df = recalibrate(model, data, progress=False)

    assert torch.equal(model.bn1.running_mean, frozen_before[0])
    assert torch.equal(model.bn1.running_var, frozen_before[1])
    assert not model.bn1.training and model.bn2.training and model.training  # flags kept
    # What the model sees in training: bn1 on its frozen statistics, bn2 on batch statistics.
    with torch.no_grad():
        h2 = torch.cat(
            [
                nn.functional.conv2d(
                    torch.relu(bn_eval(model.conv1(x).double(), model.bn1)),
                    model.conv2.weight.double(),
                    padding=1,
                )
                for x in data
            ]
        )
    mean, var, _ = moments(h2)
    torch.testing.assert_close(model.bn2.running_mean.double(), mean, rtol=0, atol=2e-6)
    torch.testing.assert_close(model.bn2.running_var.double(), var, rtol=2e-6, atol=1e-7)
    rows = df.set_index(["layer", "metric"])["value"]
    assert rows[("bn1", "frozen")] == 1.0
    assert ("bn1", "samples") not in rows.index
    assert rows[("bn2", "samples")] == 16 * 36


def test_frozen_false_reestimates_every_layer_and_names_freeze_explicitly() -> None:
    model = pretrained_backbone()
    model.train()
    model.bn1.eval()
    data = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    recalibrate(model, data, frozen=False, progress=False)
    with torch.no_grad():
        h1 = torch.cat([model.conv1(x).double() for x in data])
    torch.testing.assert_close(
        model.bn1.running_mean.double(), h1.mean([0, 2, 3]), rtol=0, atol=2e-6
    )

    named = pretrained_backbone()
    named.eval()  # the whole model in eval mode: "auto" freezes nothing, a name does
    kept = named.bn2.running_var.clone()
    recalibrate(named, data, frozen=["bn2"], progress=False)
    assert torch.equal(named.bn2.running_var, kept)
    assert not torch.equal(named.bn1.running_var, pretrained_backbone().bn1.running_var)
    with pytest.raises(ValueError, match='frozen must be "auto", False'):
        recalibrate(named, data, frozen=True, progress=False)


def test_check_mismatch_train_pass_keeps_frozen_layers_on_running_statistics() -> None:
    model = pretrained_backbone()
    model.train()
    model.bn1.eval()
    x = torch.randn(6, 3, 6, 6)
    df = check_mismatch(model, x)
    rows = df.set_index(["layer", "metric"])["value"]
    # bn1 behaves the same in training and in eval: no gap of its own
    assert rows[("bn1", "local_gap")] == 0.0
    assert rows[("bn1", "output_gap")] == 0.0
    # bn2's train pass sees bn1's eval-mode output, as the model does in training
    with torch.no_grad():
        h2 = nn.functional.conv2d(
            torch.relu(bn_eval(model.conv1(x).double(), model.bn1)),
            model.conv2.weight.double(),
            padding=1,
        )
        y_b, y_r = bn_batch(h2, model.bn2), bn_eval(h2, model.bn2)
    expected = ((y_b - y_r).norm() / y_b.norm()).item()
    assert rows[("bn2", "local_gap")] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_unequal_batches_large_offsets_and_a_shared_layer_match_float64(offset: float) -> None:
    """Per-batch moments in float32, pooled in float64: within float32 storage of the reference."""

    class Shared(nn.Module):
        """One BN layer called twice per forward."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(5, 7)
            self.fc2 = nn.Linear(7, 7)
            self.bn = nn.BatchNorm1d(7)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.fc2(self.bn(self.fc1(x))))

    torch.manual_seed(3)
    model = Shared()
    with torch.no_grad():
        model.fc1.bias.add_(offset)
        model.fc2.bias.add_(offset)
    data = [torch.randn(n, 5) * 3 for n in (2, 31, 7, 64)]
    recalibrate(model, data, progress=False)
    with torch.no_grad():  # the float32 inputs the layer saw, their moments in float64
        inputs = []
        for x in data:
            h1 = model.fc1(x)
            z = nn.functional.batch_norm(h1, None, None, model.bn.weight, model.bn.bias, True)
            inputs += [h1, model.fc2(z)]
        mean, var, _ = moments(torch.cat(inputs).double())
    # float32 storage of the buffers: a few ulp of the reference value
    ulp = torch.finfo(torch.float32).eps
    assert ((model.bn.running_mean.double() - mean).abs() <= 4 * ulp * mean.abs() + 1e-6).all()
    assert ((model.bn.running_var.double() - var).abs() <= 4 * ulp * var).all()


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_layers_read_bn_kernel_moments_exactly(
    offset: float, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stock BatchNorm2d on contiguous CPU input gives the moments its own kernel took (no
    extra pass over the activation); channels-last input is reduced by ``input_moments``. Both
    are within float32 storage of a float64 reference, on unequal batches and a shared layer,
    and momentum and the other buffers are put back."""
    import bnprobe.recalibration as recal

    reduced = []
    real = recal.input_moments
    monkeypatch.setattr(recal, "input_moments", lambda x: reduced.append(1) or real(x))

    class SharedConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6, momentum=0.01)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.c2(torch.relu(self.bn(self.c1(x)))))

    torch.manual_seed(5)
    model = SharedConv()
    with torch.no_grad():
        model.c1.bias.add_(offset)
        model.c2.bias.add_(offset)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    data = [(torch.randn(n, 3, 9, 9) * 2).contiguous(memory_format=fmt) for n in (2, 17, 5, 32)]
    tracked = model.bn.num_batches_tracked.clone()
    recalibrate(model, data, progress=False)
    assert model.bn.momentum == 0.01 and model.bn.track_running_stats
    assert torch.equal(model.bn.num_batches_tracked, tracked)
    assert (len(reduced) > 0) == (layout == "channels_last")
    with torch.no_grad():
        inputs = []
        for x in data:
            h1 = model.c1(x)
            z = nn.functional.batch_norm(h1, None, None, model.bn.weight, model.bn.bias, True)
            inputs += [h1, model.c2(torch.relu(z))]
        mean, var, _ = moments(torch.cat(inputs).double())
    ulp = torch.finfo(torch.float32).eps
    assert ((model.bn.running_mean.double() - mean).abs() <= 4 * ulp * mean.abs() + 1e-6).all()
    assert ((model.bn.running_var.double() - var).abs() <= 4 * ulp * var).all()


def test_biased_variance_convention_and_structured_batches() -> None:
    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, images: Tensor, boxes: Tensor) -> Tensor:
            return self.bn(self.fc(images)) + boxes.sum()

    torch.manual_seed(4)
    data = [{"images": torch.randn(n, 4), "boxes": torch.randn(n, 4)} for n in (3, 9)]
    biased = Detector()
    unbiased = Detector()
    unbiased.load_state_dict(biased.state_dict())
    run = lambda m, b: m(b["images"], b["boxes"])  # noqa: E731
    recalibrate(biased, data, forward_fn=run, unbiased=False, progress=False)
    recalibrate(unbiased, data, forward_fn=run, progress=False)
    with torch.no_grad():
        h = torch.cat([biased.fc(d["images"]).double() for d in data])
    torch.testing.assert_close(
        biased.bn.running_var.double(), h.var(0, unbiased=False), rtol=2e-6, atol=0
    )
    torch.testing.assert_close(
        unbiased.bn.running_var.double(), h.var(0, unbiased=True), rtol=2e-6, atol=0
    )
    with pytest.raises(ValueError, match="forward_fn failed on batch 0"):
        recalibrate(biased, data, forward_fn=lambda m, b: m(b), progress=False)


def test_fewer_batches_than_asked_warns() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    data = [torch.randn(5, 3) for _ in range(3)]
    with pytest.warns(UserWarning, match="num_batches=5 but the batches ran out after 3"):
        recalibrate(model, data, num_batches=5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recalibrate(model, data, num_batches=3, progress=False)


# --------------------------------------------------------------------------- two gloo ranks


@pytest.fixture(scope="module")
def ddp_recal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recal_ddp")
    launch_ranks("tests.recal_ddp_run", out, cwd=ROOT)
    return out


def test_ranks_write_identical_statistics_equal_to_the_union_of_shards(ddp_recal: Path) -> None:
    from tests.recal_ddp_run import make_model, shard

    r0 = torch.load(ddp_recal / "rank0.pt")
    r1 = torch.load(ddp_recal / "rank1.pt")
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # bit-identical on both ranks
    union = make_model()
    recalibrate(union, shard(0) + shard(1), progress=False)
    for key, value in union.state_dict().items():
        torch.testing.assert_close(r0[key], value, rtol=1e-6, atol=1e-7)
    # and the shards really differ: each rank alone would be far from the union
    alone = make_model()
    recalibrate(alone, shard(0), progress=False)
    assert (
        alone.state_dict()["2.running_mean"] - union.state_dict()["2.running_mean"]
    ).abs().max() > 0.3


def test_a_rank_that_fails_makes_every_rank_raise_instead_of_hanging(ddp_recal: Path) -> None:
    for rank in (0, 1):
        text = (ddp_recal / f"failure{rank}.txt").read_text()
        assert "recalibrate failed on rank(s) [1]" in text, text
    assert "RuntimeError: boom on rank 1" in (ddp_recal / "failure1.txt").read_text()


# --------------------------------------------------------------------------- after SWA


def test_checking_a_swa_run_finds_stale_statistics_and_recalibrate_repairs_them(
    tmp_path: Path,
) -> None:
    """docs/mismatch.md's SWA recipe on a real Lightning StochasticWeightAveraging fit."""
    import copy

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import StochasticWeightAveraging

    from tests.reference import Lit, loader, mlp1d, trainer

    class KeepBuffers(pl.Callback):
        """The BN buffers before averaging starts: what a skipped SWA BN update leaves."""

        def __init__(self) -> None:
            self.buffers: dict[str, Tensor] = {}

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if trainer.current_epoch == 1:
                self.buffers = {k: v.clone() for k, v in module.net.named_buffers()}

    torch.manual_seed(0)
    net = mlp1d()
    data = loader((6,), n=128, batch_size=16)
    keep = KeepBuffers()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    trainer(tmp_path, max_epochs=4, callbacks=[swa, keep], logger=False).fit(Lit(net, 0.05), data)

    stale = copy.deepcopy(net)
    for name, buf in keep.buffers.items():
        stale.get_buffer(name).copy_(buf)
    net.train()
    stale.train()
    shift = "mean_shift_before"
    fresh_rows = recalibrate(net, data, apply=False, progress=False)
    stale_rows = recalibrate(stale, data, apply=False, progress=False)
    ok = fresh_rows.set_index("metric")["value"][shift]
    bad = stale_rows.set_index("metric")["value"][shift]
    assert ok < 0.1  # Lightning's own BN pass after averaging is close to the population
    assert bad > 3 * ok  # statistics of the pre-average weights are visibly off

    x = next(iter(data))
    before = check_mismatch(stale, x).set_index(["layer", "metric"])["value"]
    after_rows = recalibrate(stale, data, progress=False).set_index("metric")["value"]
    after = check_mismatch(stale, x).set_index(["layer", "metric"])["value"]
    assert after_rows["mean_shift_after"] < 1e-5
    assert after[("1", "local_gap")] < before[("1", "local_gap")]


def test_the_callback_probe_keeps_the_layers_frozen_in_training_frozen() -> None:
    """After validation the whole model is in eval mode; the probe still knows which BN layers
    were frozen while the model trained (the tap saw them) and gives them no gap of their own."""
    from bnprobe import BNProbe
    from tests.replicas import FrozenBNFinetune, fit, image_data

    data = image_data(batches=4, val_batches=1)
    net = FrozenBNFinetune(train_convs=True)
    net.pretrain([x * 2.0 + 1.0 for x, _ in data.train])  # statistics of other data
    probe = BNProbe(every_n_steps=1, save_dir=False, summary=False)
    fit(net, data, steps=4, probe=probe)
    df = probe.to_dataframe()
    local = df[(df["stage"] == "probe") & (df["metric"] == "local_gap")]
    assert set(local["layer"]) == {"net.backbone.1", "net.backbone.4"}
    assert (local["value"] == 0.0).all()
    # the same model judged standalone, in training mode, agrees; with frozen=False it does not
    net.train()
    batch = data.probe_batch
    assert (check_mismatch(net, batch).query("metric == 'local_gap'")["value"] == 0.0).all()
    loose = check_mismatch(net, batch, frozen=False).query("metric == 'local_gap'")["value"]
    assert (loose > 0.1).all()


def test_kernel_moments_are_finite_when_the_old_statistics_are_not() -> None:
    """BN's update is 1·batch + 0·old on the kernel path: old inf/NaN running statistics (a
    diverged run, the usual reason to recalibrate) must not leak into the batch moments."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(float("nan"))
        model[1].running_var.fill_(float("inf"))
    data = [torch.randn(n, 3, 8, 8) for n in (5, 9)]
    recalibrate(model, data, progress=False)
    with torch.no_grad():
        mean, var, _ = moments(torch.cat([model[0](x) for x in data]).double())
    ulp = torch.finfo(torch.float32).eps
    assert ((model[1].running_mean.double() - mean).abs() <= 4 * ulp * mean.abs() + 1e-6).all()
    assert ((model[1].running_var.double() - var).abs() <= 4 * ulp * var).all()
