"""The benchmark scripts; ``python -m benchmarks`` runs the performance suite (``benchmarks/run.py``)."""
