"""The committed agent/_pb/ is what scripts/gen_proto.py makes of proto/ today."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "agent" / "_pb"


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    gen = _load_generator()
    written = gen.generate(tmp_path)  # type: ignore[attr-defined]
    fresh = {p.name: p.read_text() for p in written}
    committed = {
        p.name: p.read_text()
        for p in COMMITTED.iterdir()
        if p.is_file() and p.suffix in (".py", ".pyi")
    }
    assert sorted(fresh) == sorted(committed), "agent/_pb/ has extra or missing files"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"agent/_pb/ is stale ({stale}): run `python scripts/gen_proto.py`"


def test_no_top_level_proto_package() -> None:
    """Nothing generated imports (or would install) a top-level `svcd`/`proto` package."""
    bad = re.compile(r"^\s*(from|import)\s+(svcd|proto)\b", re.MULTILINE)
    for path in COMMITTED.glob("*.py*"):
        assert not bad.search(path.read_text()), path
    before = set(sys.modules)
    import agent._pb.agent_pb2_grpc  # noqa: F401

    assert not {"svcd", "proto"} & (set(sys.modules) - before)


def test_descriptor_keeps_the_proto_path() -> None:
    from agent._pb import agent_pb2

    assert agent_pb2.DESCRIPTOR.name == "svcd/v1/agent.proto"
    assert agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name == "svcd.v1.Agent"
