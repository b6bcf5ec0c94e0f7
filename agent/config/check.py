"""`svcd check-config FILE`: validate a config file, say OK or list every problem.

Exit status 0 when the file (with its includes) is valid, 2 when it is not (SPEC.md
"Commands"); problems go to stderr, one per line, as `file: key: reason`.
"""

from __future__ import annotations

import sys
from typing import TextIO

from agent.config.load import load_config
from agent.config.model import ConfigError

EXIT_OK = 0
EXIT_INVALID = 2


def check_config_main(path: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """`svcd check-config FILE`: 0 and `FILE: OK (N services)`, or 2 and every problem."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return EXIT_INVALID
    count = len(config.services)
    print(f"{path}: OK ({count} service{'s' if count != 1 else ''})", file=out)
    return EXIT_OK
