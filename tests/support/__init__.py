"""Support code of the test suite: servers and databases, plain HTTP, money, accounts, mail,
admin rows, the proxy harness, and the mock upstreams and fake Stripe the proxy talks to.

Fixtures live in ``tests/conftest.py``; everything a test module imports lives here.
"""

from pathlib import Path

#: the repository: its pricing.yaml and tiers.yaml are the ones the suite runs on
ROOT = Path(__file__).resolve().parents[2]
