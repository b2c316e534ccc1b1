"""``python -m benchmarks.bench``: see the package's docstring, or ``--help``."""

from benchmarks.bench.cli import main

raise SystemExit(main())
