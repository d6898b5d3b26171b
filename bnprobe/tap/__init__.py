"""Find the BatchNorm layers of a model and measure them with forward hooks.

:class:`BNTap` registers one forward pre-hook per BN layer, once, and removes them on
:meth:`BNTap.detach` (idempotent; also a context manager). Between logging steps
the hooks only check a flag. On a logging step (:meth:`BNTap.start` ... :meth:`BNTap.collect`)
the pre-hook of the step's first BN forward copies what each layer's first forward starts
from, for every layer at once: the running buffers, gamma and beta (one ``torch.cat`` per
device and dtype; a lazy layer not initialized yet is copied by its own pre-hook). The batch
moments follow exactly from the running buffers before and after the update
(:func:`bnprobe.stats.recover_moments`); the updated buffers are read at :meth:`BNTap.collect`,
or copied by a second call's pre-hook when the layer runs again. Only where the moments cannot
be recovered does the pre-hook compute them from the input (one ``var_mean``).
:meth:`BNTap.collect` moves every layer's values to the host in one transfer per device and
derives all metrics there in float64 numpy (:func:`bnprobe.stats.segment_metrics`). No
activation is kept and nothing synchronizes with the host inside a hook.

The package, in the order the data flows:

* :mod:`~bnprobe.tap.layers`: which layers (:func:`find_layers`), what is kept of each one, the
  drift and warm-up references;
* :mod:`~bnprobe.tap.hooks`: :class:`BNTap`, its hook handles, the step state machine
  (``start``/``collect``) and its two paths, a measured step and a pooled (validation) step;
* :mod:`~bnprobe.tap.trace`: the one-step producer trace (``input_bias``, ``input_dropout``);
* :mod:`~bnprobe.tap.packing`: each layer's values as one raw vector, moved to the host at once
  and read back by a cached index plan;
* :mod:`~bnprobe.tap.rows`: the rows of a step and :class:`Snapshot`, whose parts are
  :class:`bnprobe.store.Rows` only.

No module of the package imports Lightning or TensorBoard; pandas is used only where rows become a
DataFrame (:attr:`Snapshot.rows`).
"""

from bnprobe.tap.hooks import BNTap
from bnprobe.tap.layers import ROOT, LayerSelection, find_layers
from bnprobe.tap.rows import Snapshot

__all__ = ["ROOT", "BNTap", "LayerSelection", "Snapshot", "find_layers"]
