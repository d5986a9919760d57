"""``python -m batchloop``: the same as the ``batchloop`` command."""

from .cli import main

raise SystemExit(main())
