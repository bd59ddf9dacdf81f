"""SIGKILL the indexer in the middle of a stream; after a restart every event is applied exactly once.

The scenario is tests/support/crash.py (benchmarks/crash_recovery.py runs it 20 times at random points).
"""

import pytest

from tests.support.crash import run_scenario

pytestmark = pytest.mark.integration


def test_sigkill_mid_stream_then_restart_applies_every_event_exactly_once(
    tmp_path, kafka_settings, example_plugin_site
):
    outcome = run_scenario(kafka_settings.kafka, tmp_path, example_plugin_site, kill_after=700)
    assert outcome.consumed_at_kill < 2000, "the stream ended before the kill; make it longer"
    assert outcome.checkpoints_before_kill > 0, "no checkpoint was written before the kill"
