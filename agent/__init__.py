"""svcd agent: the daemon, its config, control API, registry, metrics and the svctl CLI."""

__version__ = "0.1.0"
