"""`svcd`: run the agent in the foreground, or validate a config file.

    svcd --config FILE          run (logs to stderr, one line per event)
    svcd check-config FILE      exit 0 when valid, else print every problem and exit 2
"""

from __future__ import annotations

import argparse
import sys

from agent import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svcd", description="Service-discovery-aware process supervisor for socket servers."
    )
    parser.add_argument("--version", action="version", version=f"svcd {__version__}")
    parser.add_argument("--config", "-c", metavar="FILE", help="the agent's TOML config")
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("check-config", help="validate a config file (exit 0 or 2)")
    check.add_argument("file", metavar="FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        from agent.config import check_config_main

        return check_config_main(args.file)
    if not args.config:
        print("svcd: --config FILE is required (or: svcd check-config FILE)", file=sys.stderr)
        return 2
    from agent.daemon import run

    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
