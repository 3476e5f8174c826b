"""Benchmark of the costproxy proxy against a bare aiohttp pass-through (``python -m bench.run``)."""
