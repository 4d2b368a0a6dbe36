"""RPC layer: server bootstrap, the one status mapping, proto <-> domain conversion, client channels, the launcher."""
