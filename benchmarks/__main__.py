"""``python -m benchmarks``: the performance suite (``benchmarks/run.py``)."""

from benchmarks.run import main

raise SystemExit(main())
