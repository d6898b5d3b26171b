"""TensorBoard: the tag scheme, writing, the Custom Scalars layout, figures, and reading event
files back into the SPEC table, in one package with one way to write each kind of point.

Tags (one run = one folder of event files)::

    bnprobe/<stage>/<metric>/<layer>      scalar: a layer aggregate (channel NA, rank 0)
    bnprobe/<stage>/epoch                 scalar: the trainer epoch of that stage at that step
    bnprobe/<stage>/hist/<name>/<layer>   histogram of a per-channel vector (gamma, beta, d, v)
    bnprobe/<stage>/figure/<name>         image: a matplotlib figure (see bnprobe.figures)
    custom_scalars__config__              the Custom Scalars layout (:func:`write_layout`)

The tag root is ``bnprobe``, or ``<prefix>-bnprobe`` for a Lightning logger made with
``prefix=...`` (what its ``log_metrics`` turns ``bnprobe/...`` keys into): scalars, histograms,
figures and the layout's regexes all use the same root (:func:`tag_root`), and the reader
accepts any root that ends in ``bnprobe`` after a separator.

``<layer>`` is the qualified name from ``named_modules()``, written as is, except the
whole-model layer ``<model>``, which is spelled ``_model_`` (what tag sanitizers such as
tensorboardX's turn it into anyway, and safe in URLs and regexes). A module literally named
``_model_``, ``_model__``, ... gets one more trailing underscore, so the mapping is one to one
and :func:`parse_tag` inverts :func:`scalar_tag` exactly. Per-channel rows are never logged
as scalars; their distribution goes into the histograms.

Modules: :mod:`~bnprobe.tensorboard.tags` (the scheme), :mod:`~bnprobe.tensorboard.write` (the
one scalar writer and the one histogram writer), :mod:`~bnprobe.tensorboard.layout` (Custom Scalars
layout, figures), :mod:`~bnprobe.tensorboard.read` (event files -> table) and
:mod:`~bnprobe.tensorboard.events` (bnprobe's own event file: :class:`EventWriter`). Nothing here
imports Lightning: the callback makes one :class:`EventWriter` in each ``TensorBoardLogger``'s
``log_dir`` (next to Lightning's own event file; TensorBoard reads both as one run), and a plain
PyTorch loop one in its ``log_dir``.
"""

from __future__ import annotations

from bnprobe.tensorboard.events import EventFileError, EventWriter
from bnprobe.tensorboard.layout import (
    FIGURE_METRICS,
    add_figures,
    default_charts,
    layout,
    render,
    write_layout,
)
from bnprobe.tensorboard.read import read_runs, read_tensorboard
from bnprobe.tensorboard.tags import (
    HIST_BINS,
    HIST_NAMES,
    METRICS_BY_STAGE,
    MODEL_TAG,
    PREFIX,
    Tag,
    epoch_tag,
    figure_tag,
    hist_tag,
    parse_tag,
    scalar_metrics,
    scalar_tag,
    tag_root,
)
from bnprobe.tensorboard.write import (
    Writer,
    add_histograms,
    histogram_bytes,
    histogram_protos,
    snapshot_metrics,
    summary_bytes,
    write_histograms,
    write_scalars,
    write_snapshot,
)

__all__ = [
    "FIGURE_METRICS",
    "HIST_BINS",
    "HIST_NAMES",
    "METRICS_BY_STAGE",
    "MODEL_TAG",
    "PREFIX",
    "EventFileError",
    "EventWriter",
    "Tag",
    "Writer",
    "add_figures",
    "add_histograms",
    "default_charts",
    "epoch_tag",
    "figure_tag",
    "hist_tag",
    "histogram_bytes",
    "histogram_protos",
    "layout",
    "parse_tag",
    "read_runs",
    "read_tensorboard",
    "render",
    "scalar_metrics",
    "scalar_tag",
    "snapshot_metrics",
    "summary_bytes",
    "tag_root",
    "write_histograms",
    "write_layout",
    "write_scalars",
    "write_snapshot",
]
