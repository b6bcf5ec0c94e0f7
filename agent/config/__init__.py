"""svcd's config: TOML (plus includes) parsed once into frozen dataclasses, and reload plans.

Responsibility: turn `svcd.toml` and the files it includes into a `Config` whose every
value has been checked, or raise one `ConfigError` listing *every* problem found, each
naming its file, its dotted key and the reason (`svcd.toml: services.api.count: must be
>= 1, got 0`). Nothing downstream re-validates: the supervisor trusts a `ServiceSpec`.

Invariants:
- A config is parsed once; the result is immutable (frozen dataclasses, mappingproxy).
- Parsing never runs user code and never executes a command: a string `command` is
  split with shlex and nothing else. It reads only the config files themselves (regular
  files, 1 MiB each at most, a bounded number, bounded include depth) and checks that
  referenced paths exist (`cwd`, `env_file`, TLS files) and users/groups resolve.
- Any input yields a `Config` or a `ConfigError`; no other exception escapes for any
  TOML text (a fuzz test holds us to it).
- Relative paths resolve against the directory of the file that wrote them.
- Every key that is read is marked; whatever is left in a table is an unknown key.

The modules, each with one job (a module imports only those above it):
- `model`: the frozen result (`Config`, `AgentSettings`, `RegistrySettings`) and errors
- `wording`: how a problem quotes values and keys back, "did you mean" hints
- `values`, `addresses`: check one value (duration, size, signal, ...; host:port, URLs)
- `table`: one TOML table: typed getters that record problems, unknown keys
- `files`: read the main file and its includes (limits, TOML syntax errors, cycles)
- `crosschecks`: listeners that collide across services and the agent
- `service_parts`, `services`, `settings`: the sections of a config file
- `load`: `parse_config`, `load_config`; `plan`: reload plans; `check`: check-config
- `snapshot`: a `Config` as JSON data and back (the agent's config history)
Only the names below are the package's interface; the modules are its inside.
"""

from agent.config.check import check_config_main
from agent.config.files import MAX_FILE_BYTES as MAX_FILE_BYTES
from agent.config.load import load_config, parse_config
from agent.config.model import (
    AgentSettings,
    Config,
    ConfigError,
    ConfigProblem,
    RegistrySettings,
)
from agent.config.plan import Change, ReloadPlan, ServicePlan, plan
from agent.config.services import MAX_WORKERS as MAX_WORKERS
from agent.config.snapshot import config_from_data, config_to_data

__all__ = [
    "AgentSettings",
    "Change",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "RegistrySettings",
    "ReloadPlan",
    "ServicePlan",
    "check_config_main",
    "config_from_data",
    "config_to_data",
    "load_config",
    "parse_config",
    "plan",
]
