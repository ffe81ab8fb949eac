"""``hisam stream worker``'s settings: options, and the two knobs read from its environment."""

from __future__ import annotations

import argparse

from hisam.jobs.stream_worker import add_arguments, settings_from_args


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--bootstrap", "127.0.0.1:1", *argv])


def test_the_environment_sets_the_idle_fetch_pause_and_the_fault_hook() -> None:
    env = {"HISAM_IDLE_FETCH_MS": "20", "HISAM_FAULT_EXIT_AFTER_APPENDS": "600"}
    settings = settings_from_args(_args("--batch-size", "300", "--within-ms", "5"), env)
    assert settings.idle_fetch_s == 0.02
    assert settings.fault_exit_after_appends == 600
    assert (settings.batch_size, settings.batch_within_s, settings.bootstrap) == (300, 0.005, "127.0.0.1:1")


def test_without_them_the_pause_is_5_ms_and_no_fault_is_injected() -> None:
    for env in ({}, {"HISAM_FAULT_EXIT_AFTER_APPENDS": "0"}):
        settings = settings_from_args(_args(), env)
        assert settings.idle_fetch_s == 0.005
        assert settings.fault_exit_after_appends is None
