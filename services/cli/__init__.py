"""Command-line tools that talk to a running Tidings deployment over its public gRPC API."""
