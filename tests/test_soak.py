"""The soak, short: the example app under load while backends are killed and PostgreSQL restarts."""

from benchmarks.soak import soak


def test_the_app_recovers_from_killed_backends_and_a_restart_without_leaking() -> None:
    summary = soak(seconds=10, concurrency=8, seed=3)
    assert summary.ok, summary.line() + "\n" + "\n".join(summary.unexpected + summary.orphaned)
    assert summary.terminated > 0
    assert summary.recovery is not None
    assert summary.leaked == 0
    assert summary.orphaned == []
    assert summary.answers["deadline_504"] > 0
    assert summary.answers["hung_up"] > 0
    assert summary.answers["create_201"] > 0
