"""agent.config.plan: what a reload does, service by service, and how it reads."""

from __future__ import annotations

import json
from pathlib import Path

from agent.config import Config, parse_config, plan


def config(tmp_path: Path, text: str) -> Config:
    return parse_config(text, str(tmp_path / "svcd.toml"))


BASE = """
[agent]
name = "web-1"
metrics_address = "127.0.0.1:9464"
control_socket = "/tmp/svcd-plan-test.sock"

[registry]
endpoints = ["http://127.0.0.1:2379"]
password = "hunter2"
username = "svcd"

[services.web]
command = ["python", "-m", "web"]
count = 2
listen = ["tcp://127.0.0.1:8080"]
env = { SECRET = "abc" }
[services.web.health]
kind = "http"
interval = 2

[services.db]
command = ["db"]

[services.old]
command = ["old"]
"""


def test_first_plan_adds_everything(tmp_path: Path) -> None:
    new = config(tmp_path, BASE)
    result = plan(None, new)
    assert result.added == ("web", "db", "old")
    assert result.removed == result.unchanged == ()
    assert result.rollout == result.live == ()
    assert result.agent_changes == ()
    assert result.lines() == [
        "+ web (new, 2 workers)",
        "+ db (new, 1 worker)",
        "+ old (new, 1 worker)",
    ]
    assert result.config is new


def test_same_config_changes_nothing(tmp_path: Path) -> None:
    result = plan(config(tmp_path, BASE), config(tmp_path, BASE))
    assert result.empty
    assert result.unchanged == ("web", "db", "old")
    assert result.lines() == ["= web unchanged", "= db unchanged", "= old unchanged"]


def test_categories(tmp_path: Path) -> None:
    changed = (
        BASE.replace('command = ["old"]', 'command = ["new"]')
        .replace("[services.old]", "[services.new]")
        .replace('command = ["db"]', 'command = ["db"]\ncount = 3')
        .replace('command = ["python", "-m", "web"]', 'command = ["python", "-m", "web2"]')
    )
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    assert result.added == ("new",)
    assert result.removed == ("old",)
    assert [p.name for p in result.rollout] == ["web"]
    assert [p.name for p in result.live] == ["db"]
    assert result.unchanged == ()
    assert not result.empty
    assert result.lines() == [
        "+ new (new, 1 worker)",
        "- old",
        "~ web: rolling reload (command changed)",
        "~ db: live (count 1 -> 3)",
    ]


def test_live_changes_show_old_and_new_values(tmp_path: Path) -> None:
    changed = BASE.replace("interval = 2", "interval = 5\nrise = 4")
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    assert result.rollout == ()
    (web,) = result.live
    assert [c.key for c in web.changes] == ["health.interval", "health.rise"]
    assert "~ web: live (health.interval 2 -> 5, health.rise 2 -> 4)" in result.lines()


def test_live_categories_from_the_spec(tmp_path: Path) -> None:
    # backoff, logs, registry settings and ready_timeout apply to running workers
    extra = (
        "ready_timeout = 5\n"
        "[services.db.backoff]\nmax = 5\n[services.db.logs]\nbackups = 1\n"
        "[services.db.registry]\nderegister_delay = 3\n"
    )
    changed = BASE.replace('command = ["db"]', 'command = ["db"]\n' + extra)
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    (db,) = result.live
    assert {c.key for c in db.changes} == {
        "ready_timeout",
        "backoff.max",
        "logs.backups",
        "deregister_delay",
    }


def test_graceful_timeout_rolls_as_the_workers_drain_bound_comes_from_it(tmp_path: Path) -> None:
    changed = BASE.replace('command = ["db"]', 'command = ["db"]\ngraceful_timeout = 10')
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    assert [p.name for p in result.rollout] == ["db"] and result.live == ()
    assert "graceful_timeout 30 -> 10" in result.rollout[0].summary


def test_listener_change_is_a_rollout_with_both_sides(tmp_path: Path) -> None:
    changed = BASE.replace('listen = ["tcp://127.0.0.1:8080"]', 'listen = ["tcp://127.0.0.1:8081"]')
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    (web,) = result.rollout
    assert web.summary == "listen changed (+tcp://127.0.0.1:8081, -tcp://127.0.0.1:8080)"


def test_health_kind_change_that_adds_the_private_listener_rolls(tmp_path: Path) -> None:
    changed = BASE.replace('command = ["db"]', 'command = ["db"]\nhealth = { kind = "tcp" }')
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    assert [p.name for p in result.rollout] == ["db"]
    assert 'health.kind "none" -> "tcp"' in result.rollout[0].summary


def test_env_values_never_appear_in_a_plan(tmp_path: Path) -> None:
    changed = BASE.replace('SECRET = "abc"', 'SECRET = "xyz", OTHER = "1"')
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    (web,) = result.rollout
    assert web.summary == "env changed (OTHER, SECRET)"
    text = json.dumps(result.as_dict()) + "\n".join(result.lines())
    assert "abc" not in text and "xyz" not in text


def test_agent_changes_need_a_restart(tmp_path: Path) -> None:
    changed = (
        BASE.replace("127.0.0.1:9464", "127.0.0.1:9465")
        .replace('"hunter2"', '"hunter3"')
        .replace('name = "web-1"', 'name = "web-2"')
    )
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    assert result.empty, "agent settings alone do not touch services"
    assert [c.key for c in result.agent_changes] == [
        "agent.name",
        "agent.metrics_address",
        "registry.password",
    ]
    lines = result.lines()
    assert '! agent.name "web-1" -> "web-2" (needs an agent restart)' in lines
    assert "! registry.password changed (needs an agent restart)" in lines
    assert "hunter" not in json.dumps(result.as_dict()) + "\n".join(lines)


def test_registry_added_or_removed(tmp_path: Path) -> None:
    without = BASE.split("[registry]")[0] + "[services.db]\ncommand = ['db']\n"
    result = plan(config(tmp_path, without), config(tmp_path, BASE))
    assert [c.key for c in result.agent_changes] == ["registry"]
    assert result.agent_changes[0].summary == 'registry none -> ["http://127.0.0.1:2379"]'


def test_registry_default_deregister_delay_shows_in_services(tmp_path: Path) -> None:
    changed = BASE.replace('username = "svcd"', 'username = "svcd"\nderegister_delay = 2')
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    assert result.agent_changes == ()
    assert [p.name for p in result.live] == ["web", "db", "old"]
    assert result.live[0].summary == "deregister_delay 0 -> 2"


def test_as_dict(tmp_path: Path) -> None:
    changed = BASE.replace("[services.old]", "[services.new]").replace("count = 2", "count = 4")
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    data = result.as_dict()
    assert json.loads(json.dumps(data)) == data, "plain JSON types only"
    assert data["added"] == [{"service": "new", "count": 1}]
    assert data["removed"] == ["old"]
    assert data["rollout"] == []
    assert data["live"] == [
        {
            "service": "web",
            "changes": [{"key": "count", "old": "2", "new": "4", "summary": "count 2 -> 4"}],
        }
    ]
    assert data["unchanged"] == ["db"]
    assert data["agent_changes"] == []


def test_modes_read_as_octal(tmp_path: Path) -> None:
    changed = BASE.replace('command = ["db"]', 'command = ["db"]\numask = "0027"')
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    assert result.rollout[0].summary == "umask unset -> 0o027"


def test_backlog_change_rolls(tmp_path: Path) -> None:
    changed = BASE.replace(
        'listen = ["tcp://127.0.0.1:8080"]',
        'listen = [{ url = "tcp://127.0.0.1:8080", backlog = 16 }]',
    )
    result = plan(config(tmp_path, BASE), config(tmp_path, changed))
    assert result.rollout[0].summary == "listen changed (backlog or order)"
