"""Fault tests: real processes (proxy, worker, Redis) killed, stopped and flushed under
traffic, each ending with ``costproxy ledger check``. Run by ``make test-faults``."""
