"""Deprecated name of :mod:`grpc_balance_mw.interceptors` (warns; kept for one release)."""

from grpc_balance_mw._renamed import moved

__getattr__, __dir__ = moved(__name__, "grpc_balance_mw.interceptors")
