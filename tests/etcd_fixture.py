"""etcd for tests (filled in by the registry work)."""
