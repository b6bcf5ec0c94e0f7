"""svcd's process supervisor: pure asyncio, no grpc or etcd imports."""
