"""``python -m benchmarks.worker SPEC``: one scenario, its answer on stdout."""

from benchmarks.worker.dispatch import main

raise SystemExit(main())
