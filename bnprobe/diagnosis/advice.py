"""The advice catalogue: what to do about each kind of finding, in one place.

Every advice ends with a link to the kind's section of the documentation, by URL (a pip user has
no docs/ folder): ``DOCS_URL + "#" + kind``.
"""

from __future__ import annotations

from bnprobe.diagnosis.findings import Kind

DOCS_URL = "https://github.com/bnprobe/bnprobe/blob/main/docs/diagnosis.md"
"""The page that explains every finding kind; advice links to ``DOCS_URL#<kind>``."""

ADVICE: dict[tuple[Kind, str], str] = {
    (Kind.STALE_RUNNING_STATS, "val"): (
        "First check that validation data is prepared like training data (same normalization "
        "and transforms). If it should differ, or training is short, recompute the running "
        "statistics on data like the deployment data after training: "
        "`bnprobe.recalibrate(model, loader, num_batches=100)`. If the statistics lag a "
        "fast-changing network, keep momentum at 0.1 or above."
    ),
    (Kind.STALE_RUNNING_STATS, "train"): (
        "Run validation (with BNProbe attached) to measure the statistics against the data eval "
        "sees. If batches are not shuffled (sorted by class or source), shuffle them. Recompute "
        "the statistics after training: `bnprobe.recalibrate(model, loader)`."
    ),
    (Kind.TRAIN_EVAL_GAP, "layer"): (
        "Read the other findings for the cause (stale_running_stats, small_batch, "
        "dropout_before_bn, suspicious_momentum). Common fixes: recompute the running statistics "
        "after training with `bnprobe.recalibrate(model, loader)`, a larger batch, no dropout "
        "right before a BN layer. Check again on any model and batch with "
        "`bnprobe.check_mismatch(model, batch)`."
    ),
    (Kind.TRAIN_EVAL_GAP, "warmup"): (
        "Recompute the running statistics before evaluating or saving: "
        "`bnprobe.recalibrate(model, loader, num_batches=100)` (PreciseBN); or let them follow "
        "the data faster with a higher momentum (`momentum=0.1`, PyTorch's default, instead of "
        "0.01), or train longer before trusting eval-mode numbers."
    ),
    (Kind.TRAIN_EVAL_GAP, "recal"): (
        "Recompute the running statistics after training, before evaluating or saving: "
        "`bnprobe.recalibrate(model, loader, num_batches=100)` (PreciseBN). If the gap keeps "
        "coming back, read the other findings for its cause (stale_running_stats, small_batch, "
        "dropout_before_bn, suspicious_momentum)."
    ),
    (Kind.SMALL_BATCH, ""): (
        "Use a larger batch per device (at least {min_batch:g} samples). Under DDP, synchronize "
        "the statistics across devices: `Trainer(sync_batchnorm=True)` or "
        "`model = nn.SyncBatchNorm.convert_sync_batchnorm(model)`. Or use a normalization that "
        "does not depend on the batch: `nn.GroupNorm(32, C)` or `nn.LayerNorm(C)`."
    ),
    (Kind.DEAD_CHANNELS, ""): (
        "Exclude BN parameters from weight decay (an optimizer parameter group with "
        "`weight_decay=0` for every `bn.weight` and `bn.bias`), check any L1 penalty on gamma "
        "(network slimming: then prune those channels on purpose) and any code that writes "
        "`bn.weight`, and try a lower learning rate."
    ),
    (Kind.DEAD_CHANNELS, "zero_init"): (
        "Nothing to do if the layer is the last BN of a residual block initialized with "
        "gamma = 0 (torchvision `zero_init_residual=True`, timm `zero_init_last`): its gammas "
        "grow once training starts. If they stay at 0, check that the layer's parameters are "
        "in the optimizer and that the learning rate is not 0."
    ),
    (Kind.VARIANCE_COLLAPSE, ""): (
        "Look upstream for what makes the input (nearly) constant: dead ReLUs, zeroed or tiny "
        "weights, a saturated activation, inputs in very small units. Check the weight "
        "initialization and learning rate, and rescale the inputs; if tiny variances are "
        "expected, lower `eps` (e.g. `nn.BatchNorm2d(C, eps=1e-8)`)."
    ),
    (Kind.SMALL_INPUT_VARIANCE, ""): (
        "Usually nothing to do: this is what a depthwise conv initialized with "
        "`kaiming_normal_(mode='fan_out')` (torchvision's MobileNet/EfficientNet init) feeds its "
        "BN. Such a layer partly acts as a fixed scale 1/sqrt(eps), in train and eval mode "
        "alike. If you want it to normalize, lower `eps` or initialize the conv with "
        "`mode='fan_in'`; if its eval mode differs, recalibrate with "
        "`bnprobe.recalibrate(model, loader)`."
    ),
    (Kind.NONFINITE, ""): (
        "Find the source: check the inputs (`assert torch.isfinite(x).all()`), lower the "
        "learning rate or clip gradients (`Trainer(gradient_clip_val=1.0)`), and run a few "
        "steps under `torch.autograd.set_detect_anomaly(True)`. One bad batch poisons the "
        "running statistics for good: reset them (`bn.reset_running_stats()`) and recompute "
        "them with `bnprobe.recalibrate(model, loader)`, or go back to an earlier checkpoint."
    ),
    (Kind.NONFINITE, "running"): (
        "Reset the layer's running statistics (`bn.reset_running_stats()`) and recompute them "
        "with `bnprobe.recalibrate(model, loader)`, or load them from an earlier checkpoint. "
        "A negative running variance comes from code that writes the buffers (a statistics "
        "update or merge tool, a fused-BN conversion): check that code."
    ),
    (Kind.FROZEN_BN, "eval_mode"): (
        "If it is not intended, find the code that calls `.eval()` on this layer (a `train()` "
        "override, a freezing helper, `model.apply(...)`) and remove it. If it is intended "
        "(fine-tuning with frozen BN), load running statistics from a model trained on similar "
        "data, and this warning is expected."
    ),
    (Kind.FROZEN_BN, "running"): (
        "Check `momentum` (0 means never update; PyTorch's default is 0.1), "
        "`track_running_stats` (switched off after construction, the layer stops updating its "
        "buffers but eval mode still uses them), and any code that restores or overwrites "
        "`running_mean`/`running_var` during training."
    ),
    (Kind.FROZEN_BN, "affine"): (
        "Fine if intended. Otherwise check `bn.weight.requires_grad` and that the layer's "
        "parameters are in the optimizer (`configure_optimizers`)."
    ),
    (Kind.UNUSED_LAYER, ""): (
        "If the layer should be used, call it in `forward()` (a common slip: defining `self.bn2` "
        "but applying `self.bn1` twice). If it is left over, delete it, or watch only the "
        "layers in use with `BNProbe(layers=[...])`."
    ),
    (Kind.NO_RUNNING_STATS, ""): (
        "Fine if intended (e.g. GAN discriminators, test-time adaptation). Otherwise create the "
        "layer with `track_running_stats=True` (the default), or evaluate with fixed, large "
        "batches."
    ),
    (Kind.SUSPICIOUS_MOMENTUM, "none"): (
        "That suits a recalibration pass after training; while training, use an exponential "
        "average (`momentum=0.1`), or recompute the statistics after training with "
        "`bnprobe.recalibrate(model, loader)`."
    ),
    (Kind.SUSPICIOUS_MOMENTUM, "tf"): (
        "Use `momentum={fixed:.2g}` (1 minus the TensorFlow value) or PyTorch's default: "
        "`nn.BatchNorm2d(C, momentum=0.1)`."
    ),
    (Kind.BIAS_BEFORE_BN, ""): (
        "Create the layer before BN with `bias=False`, e.g. "
        "`nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)` or "
        "`nn.Linear(d_in, d_out, bias=False)`; BN's beta already provides the shift."
    ),
    (Kind.DROPOUT_BEFORE_BN, ""): (
        "Move dropout after the last BatchNorm layer (e.g. just before the classifier), or "
        "lower p. If you keep it, recompute the running statistics after training with dropout "
        "off: `bnprobe.recalibrate(model, loader)`."
    ),
    (Kind.RANK_DIVERGENCE, ""): (
        "Keep DDP's default `broadcast_buffers=True`, or synchronize BN: "
        "`Trainer(sync_batchnorm=True)` or "
        "`model = nn.SyncBatchNorm.convert_sync_batchnorm(model)`. Make sure every rank sees a "
        "shuffled sample of the same data (DistributedSampler with shuffle=True). To make the "
        "ranks agree now, call `bnprobe.recalibrate(model, loader)` on every rank: it pools "
        "the ranks' moments and writes the same statistics everywhere."
    ),
}
"""Advice by (kind, variant); ``{name}`` fields are filled by :func:`advice`."""


def doc_link(kind: Kind | str) -> str:
    """The URL of the kind's section of docs/diagnosis.md."""
    return f"{DOCS_URL}#{Kind(kind)}"


def advice(kind: Kind, variant: str = "", **values: float) -> str:
    """The catalogue's advice for ``kind`` (and ``variant``) with its link to the docs."""
    text = ADVICE[(kind, variant)].format(**values)
    return f"{text} See {doc_link(kind)}."
