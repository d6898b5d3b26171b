"""Marks the slow half of the suite ``slow``, so that ``make check`` (``pytest -m "not slow"``)
runs the fast half in a couple of minutes.

Slow here means several seconds each on a 2-core machine (``pytest --durations=60`` says which):
real multi-epoch fits of the demo net, DDP on two processes, a TensorBoard server, a SIGKILL,
``torch.compile``, the command line in a new interpreter. They stay in ``make test``. A test can
also be marked in its own module with ``@pytest.mark.slow``.
"""

from __future__ import annotations

import pytest

SLOW_MODULES = {
    "test_ddp.py",
    "test_pathologies.py",
    "test_cli.py",
    "test_runs.py",
    "test_recorder.py",
}
"""Every test of these modules: they train demo nets or several Trainers, spawn DDP ranks or
subprocesses."""

SLOW_TESTS = {
    "test_callback.py": {
        "test_hooks_removed_after_fit_and_after_failing_fit",
        "test_scalars_go_to_tensorboard_only_unless_asked_and_only_those_chosen",
        "test_training_is_bit_identical_with_the_probe",
        "test_a_logger_prefix_gives_one_tag_root_end_to_end",
        "test_without_a_logger_the_store_cannot_shadow_the_package",
    },
    "test_robust.py": {
        "test_compiled_model_is_measured_when_the_probe_attaches_first",
        "test_full_disk_warns_once_and_training_is_unchanged",
        "test_lightning_cli_config_adds_the_probe",
        "test_resumed_runs_append_to_the_same_store_without_duplicates",
        "test_layer_the_probe_cannot_read_is_switched_off_and_training_unchanged",
    },
    "test_store.py": {
        "test_many_small_appends_stay_in_a_few_compact_buffers",
        "test_every_flushed_row_survives_sigkill",
    },
    "test_tensorboard.py": {  # the tests of the `fitted` demo run and the server
        "test_fit_round_trip_memory_tensorboard_parquet",
        "test_fit_event_files_hold_layout_histograms_and_figures",
        "test_tensorboard_server_serves_the_run",
        "test_gap_figure_gets_the_whole_model_rows_the_callback_selects",
    },
    "test_recalibrate.py": {  # two gloo ranks; a SWA fit
        "test_ranks_write_identical_statistics_equal_to_the_union_of_shards",
        "test_a_rank_that_fails_makes_every_rank_raise_instead_of_hanging",
        "test_checking_a_swa_run_finds_stale_statistics_and_recalibrate_repairs_them",
    },
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.name
        name = getattr(item, "originalname", item.name)
        if module in SLOW_MODULES or name in SLOW_TESTS.get(module, ()):
            item.add_marker(pytest.mark.slow)
