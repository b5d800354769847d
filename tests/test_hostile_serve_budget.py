"""The issue's request: 1024x1024, 100 steps, a batch of 4 is within every per-field limit but held
the only worker for over 5 minutes. The default settings refuse it by its cost, and still take a
common 512x512, 30-step batch of 4."""

from __future__ import annotations

from charaforge.serve.limits import ServerSettings, check_cost


def test_default_budget_refuses_the_request_that_held_the_worker_for_minutes() -> None:
    settings = ServerSettings()
    problems = check_cost(settings, 1024, 1024, 100, 4)
    assert len(problems) == 1 and problems[0].startswith("cost: 1024x1024 px"), problems
    assert "= 419430400 is over this server's budget" in problems[0]  # 1024*1024*100*4
    assert check_cost(settings, 512, 512, 30, 4) == []
    assert settings.request_timeout_s <= 300  # and whatever fits is stopped at the time limit
