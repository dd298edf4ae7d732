"""The ``grpc.aio`` adapters, with the same names as their sync counterparts."""
