"""A Config as JSON data and back (the agent's config history)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import Config, config_from_data, config_to_data, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["full.toml", "demo.toml", "minimal.toml"])
def test_round_trip_through_json(name: str) -> None:
    config = load_config(str(ROOT / "examples" / name))
    back = config_from_data(json.loads(json.dumps(config_to_data(config))))
    assert back == config
    spec = next(iter(back.services.values()))
    with pytest.raises(TypeError):
        spec.env["X"] = "1"  # type: ignore[index]  # as immutable as the loader's


def data_of_full() -> dict[str, object]:
    return json.loads(json.dumps(config_to_data(load_config(str(ROOT / "examples" / "full.toml")))))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("path", "value", "why"),
    [
        (("services", "api", "restart"), "sometimes", "is not one of"),
        (("services", "api", "count"), "2", "is not a int"),
        (("services", "api", "count"), True, "is not a int"),
        (("services", "api", "listen"), {}, "expected a list"),
        (("services", "api", "health", "expect_status"), [200], "expected 2 items"),
        (("agent",), None, "expected an object"),
    ],
)
def test_data_of_another_shape_is_refused_naming_where(
    path: tuple[str, ...], value: object, why: str
) -> None:
    data = data_of_full()
    node: dict[str, object] = data
    for key in path[:-1]:
        node = node[key]  # type: ignore[assignment]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=why) as caught:
        config_from_data(data)
    assert path[-1] in str(caught.value)


def test_unknown_fields_are_refused_and_missing_ones_take_their_defaults() -> None:
    data = data_of_full()
    data["services"]["api"]["from_the_future"] = 1  # type: ignore[index]
    with pytest.raises(ValueError, match="from_the_future"):
        config_from_data(data)
    data = data_of_full()
    del data["services"]["api"]["max_surge"]  # type: ignore[attr-defined]
    assert config_from_data(data).services["api"].max_surge == 1
    assert isinstance(config_from_data(data_of_full()), Config)
