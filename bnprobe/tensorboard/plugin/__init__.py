"""The BatchNorm tab: a TensorBoard dynamic plugin, installed with bnprobe through the
``tensorboard_plugins`` entry point (nothing to configure).

For the runs the user picks in the tab: the findings of ``bnprobe.diagnose`` on the run's store,
a layers x steps heatmap of a chosen metric per stage (train, val, probe side by side) on the
fixed colour scale of the diagnosis thresholds, and a layer's curves on click. Scalars come from
TensorBoard's data provider (what bnprobe already writes), findings, model order and per-channel
rows from the run's parquet store. docs/tensorboard.md shows it.

Modules: :mod:`.plugin` (the ``TBPlugin`` and its routes), :mod:`.data` (heatmap columns, layer
order, findings; no TensorBoard), ``static/`` (the ES modules and CSS, no build step). TensorBoard
imports this package at startup: it imports nothing beyond what ``import bnprobe`` does, and the
tab adds nothing to training (it only reads what the probe wrote).
"""

from __future__ import annotations

from bnprobe.tensorboard.plugin.plugin import PLUGIN_NAME, BatchNormPlugin

__all__ = ["PLUGIN_NAME", "BatchNormPlugin"]
