"""The entry points that turn files into a `Config`: `parse_config` and `load_config`.

They read the files (`files`), split the main file into its tables, read `[agent]`,
`[registry]` and the `[services]` of every file (`settings`, `services`), run the
checks across them (`crosschecks`), and either build the `Config` or raise one
`ConfigError` with every problem found. Only the main file may set `[agent]` and
`[registry]`; an included file holds services and further includes.
"""

from __future__ import annotations

import os
from types import MappingProxyType

from agent.config.crosschecks import agent_listeners, check_collisions
from agent.config.files import Document, Loader, read_text
from agent.config.model import Config, ConfigError
from agent.config.services import read_services
from agent.config.settings import read_agent, read_registry
from agent.config.table import Problems, Table

MAIN_ONLY = ("agent", "registry")
INCLUDED_KEYS = ("services", "include")


def parse_config(text: str, path: str = "svcd.toml") -> Config:
    """Validate `text` as the main config file at `path` (includes are read from disk).

    Raises ConfigError listing every problem.
    """
    return _load(path, text, Problems())


def load_config(path: str) -> Config:
    """Read and validate the config file at `path` and its includes.

    Raises ConfigError listing every problem (an unreadable file is one).
    """
    problems = Problems()
    text = read_text(path, path, problems)
    if text is None:
        raise ConfigError(problems.items)
    return _load(path, text, problems)


def _load(path: str, text: str, problems: Problems) -> Config:
    loader = Loader(problems)
    loader.add(path, os.path.abspath(path), text)
    if not loader.documents:
        raise ConfigError(problems.items)  # the main file did not parse: nothing to check
    main, *included = loader.documents
    top = main.table(problems)
    top.seen.add("include")  # read by the loader
    agent_table = top.sub("agent")
    registry_table = top.sub("registry")
    services_table = top.sub("services")
    top.finish()

    registry = read_registry(registry_table) if registry_table is not None else None
    agent = read_agent(agent_table, problems, main.display, main.base_dir)
    default_delay = registry.deregister_delay if registry is not None else 0.0

    # every file's top-level problems come before those inside its services
    tables = [services_table, *(_included_services(doc, main, problems) for doc in included)]
    services, bound = read_services([t for t in tables if t is not None], default_delay)
    # the agent's own listeners first: a service that takes their port is the one at fault
    check_collisions(agent_listeners(agent, main.display) + bound, problems)

    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        agent=agent,
        registry=registry,
        services=MappingProxyType(services),
        path=os.path.abspath(path),
        text=text,
        files=tuple(doc.path for doc in loader.documents),
    )


def _included_services(doc: Document, main: Document, problems: Problems) -> Table | None:
    """The `[services]` table of an included file (None: it has none)."""
    table = doc.table(problems)
    table.seen.add("include")
    for key in doc.data:
        if key in MAIN_ONLY:
            table.seen.add(key)
            table.problem(key, f"only the main config file ({main.display}) may set [{key}]")
    services = table.sub("services")
    table.finish(vocabulary=INCLUDED_KEYS)
    return services
