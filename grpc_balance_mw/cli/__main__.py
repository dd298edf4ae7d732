"""``python -m grpc_balance_mw.cli``: the same as the ``grpc-balance`` command."""

import sys

from grpc_balance_mw.cli import main

sys.exit(main())
