"""``python -m fkv_jax.cli``: the same as the ``fkv`` console command."""

import sys

from fkv_jax.cli.main import main

sys.exit(main())
