"""What a run measures: its targets, each a listener to send the scenarios to plus the
conditions it is measured under (the worker paused, Redis's ``appendfsync``), and which
target it is a variant of.

``direct``, ``floor``, ``ledger-floor`` and ``proxy`` are always measured. The options add
variants of ``proxy``, each differing from it in one thing and compared with it in the
report:

* ``--serve-workers 1,2``: ``proxy-2w``, a second proxy started with ``costproxy serve
  --workers 2`` (two processes sharing one port);
* ``--appendfsync everysec,always``: ``proxy-fsync-always``, the one-process proxy with
  Redis set to ``appendfsync always`` for its measurements (every other target is measured
  with the first value listed);
* ``--worker both``: ``proxy-noworker``, the one-process proxy with the usage worker paused.
"""

from __future__ import annotations

from dataclasses import dataclass

APPENDFSYNC_VALUES = ("everysec", "always", "no")


@dataclass(frozen=True)
class TargetSpec:
    """One target: where its requests go and what is set while it is measured."""

    name: str
    kind: str  # the request's shape: direct | floor | ledger-floor | proxy (route and key)
    listener: str  # the process it is sent to: direct | floor | ledger-floor | proxy | proxy-<N>w
    appendfsync: str = ""  # Redis appendfsync for its measurements ("": left as it is)
    pause_worker: bool = False  # the usage worker is stopped (SIGSTOP) while it is measured
    baseline: str = ""  # the target it is a variant of (compared with it in the report), if any

    @property
    def metered(self) -> bool:
        """Whether its requests run the ledger scripts and append usage events."""
        return self.kind in ("ledger-floor", "proxy")


def serve_listener(workers: int) -> str:
    """The name of the proxy process (and its listener) started with ``serve --workers workers``."""
    return "proxy" if workers == 1 else f"proxy-{workers}w"


def target_specs(worker: str, serve_workers: list[int], appendfsync: list[str]) -> dict[str, TargetSpec]:
    """Every target of a run by name, in measuring order: the references, ``proxy``, then its
    variants (see the module docstring). ``appendfsync[0]`` is the setting of every target but
    the ``proxy-fsync-<value>`` ones; none given: Redis is left as it is."""
    base = appendfsync[0] if appendfsync else ""
    specs = [TargetSpec(kind, kind, kind, base) for kind in ("direct", "floor", "ledger-floor", "proxy")]
    specs += [TargetSpec(serve_listener(n), "proxy", serve_listener(n), base, baseline="proxy") for n in serve_workers if n != 1]
    specs += [TargetSpec(f"proxy-fsync-{v}", "proxy", "proxy", v, baseline="proxy") for v in appendfsync[1:]]
    if worker == "both":
        specs.append(TargetSpec("proxy-noworker", "proxy", "proxy", base, pause_worker=True, baseline="proxy"))
    return {s.name: s for s in specs}


def parse_serve_workers(text: str) -> list[int]:
    """``--serve-workers``: worker counts, 1 (the ``proxy`` target) always among them."""
    counts = {int(n) for n in text.split(",") if n.strip()}
    if any(n < 1 for n in counts):
        raise ValueError(f"worker counts must be at least 1: {text}")
    return sorted(counts | {1})


def parse_appendfsync(text: str) -> list[str]:
    """``--appendfsync``: Redis appendfsync values, the first the reference; duplicates dropped."""
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [v for v in values if v not in APPENDFSYNC_VALUES]
    if unknown:
        raise ValueError(f"unknown appendfsync values {unknown}; known: {', '.join(APPENDFSYNC_VALUES)}")
    return values


def one_per_listener(specs: dict[str, TargetSpec]) -> list[str]:
    """The first target of every listener: what to warm up or check once per process."""
    first: dict[str, str] = {}
    for name, spec in specs.items():
        first.setdefault(spec.listener, name)
    return list(first.values())
