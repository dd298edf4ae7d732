"""Benchmark commands, ``python -m grpc_balance_mw.bench.<name>``: they print figures."""
