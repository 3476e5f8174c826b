"""Summarize a py-spy ``--format raw`` profile (collapsed stacks) of the proxy or the floor.

    python -m bench.profile_summary bench/results/profile-openai-chat-proxy.txt [--us-per-request 1000]

``python -m bench.run --profile SECONDS`` records these (``--full-filenames``) and prints
the summary. Shares are of all non-idle samples; with ``--us-per-request`` (the process's
CPU time per request, which ``run.py`` measures) each share is also shown in µs/request.

Sections: the request's stages (by the proxy function on the stack), self time by
package and module (where the CPU actually is), inclusive time of every costproxy function
and of notable library entry points, and the top self-time functions. Time spent inside
uvloop's C event loop (socket reads/writes, epoll, callbacks' C parts) has no Python frame
of its own and shows as self time of ``run_app`` / the caller of the C function.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# (label, function-name substrings) — the first proxy stage found on a stack (outermost first)
STAGES = [
    ("identify (key cache)", ("Gate.identify",)),
    ("read body + orjson", ("_read_json",)),
    ("provider.inspect", ("Provider.inspect", "OpenAIProvider.inspect")),
    ("admit (Lua hold via redis-py)", ("Gate.admit",)),
    ("post/charge (Lua via redis-py) + metrics", ("Forwarder._post",)),
    ("stream relay (meter + writes)", ("Forwarder._relay_stream",)),
    ("whole-body relay (read + usage + response)", ("Forwarder._relay_whole",)),
    ("upstream request + relay task (aiohttp client)", ("Forwarder._relay", "Forwarder.relay")),
    ("other in proxy_handler", ("proxy_handler",)),
]
# stacks outside any handler/proxy frame, by the first frame under the event loop
_LOOSE = [
    ("redis-py outside the awaiting coroutine (command writes, reply callbacks)", ("redis/",)),
    (
        "aiohttp client tasks/callbacks (request body write, response parsing)",
        ("aiohttp/client", "aiohttp/connector", "aiohttp/streams"),
    ),
    ("asyncio plumbing (tasks, futures, shields)", ("asyncio/",)),
]


# Python frames that run the event loop: time "in" them is uvloop's C code (epoll, socket I/O)
_LOOP_FRAMES = frozenset({"run_app", "Runner.run", "run_until_complete", "run_forever"})


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    if not m:
        return frame, ""
    return m["func"], m["file"]


def module_of(path: str) -> str:
    """A short module label for a file path."""
    p = path.replace("\\", "/")
    if "site-packages/" in p:
        parts = p.split("site-packages/", 1)[1].split("/")
        if parts[0] in ("aiohttp", "redis", "prometheus_client", "multidict", "yarl", "asyncpg", "uvloop"):
            return "/".join(parts[:2]) if len(parts) > 1 else parts[0]
        return parts[0]
    m = re.search(r"(?:^|/)((?:proxy|bench|tests)/[^;]*)$", p)
    if m:
        return m.group(1)
    m = re.search(r"/python3\.\d+/(.*)$", p)
    if m:
        return "stdlib/" + m.group(1)
    if p.endswith("/costproxy") or p == "costproxy":
        return "costproxy (console script)"
    return p or "?"


def package_of(module: str) -> str:
    if module.startswith("proxy/"):
        return "costproxy (proxy/*)"
    if module.startswith("bench/"):
        return "floor (bench/*)"
    if module.startswith("stdlib/asyncio"):
        return "asyncio (stdlib)"
    if module.startswith("stdlib/"):
        return "stdlib (other)"
    if module.startswith("aiohttp/web") or module in ("aiohttp/http_parser.py", "aiohttp/web_protocol.py"):
        return "aiohttp server"
    if module.startswith("aiohttp/client") or module in ("aiohttp/connector.py", "aiohttp/streams.py"):
        return "aiohttp client"
    if module.startswith("aiohttp"):
        return "aiohttp (shared: http_writer, helpers, ...)"
    return module.split("/", 1)[0]


def _loose_stage(frames: list[tuple[str, str]]) -> str:
    names = [f for f, _ in frames]
    if any("web_protocol" in fl for _, fl in frames):
        return "aiohttp server outside the handler (parse request, write response)"
    loop_at = max((i for i, f in enumerate(names) if f in _LOOP_FRAMES), default=-1)
    if loop_at == len(names) - 1:
        return "event loop itself (uvloop C: epoll, socket I/O)"
    first = module_of(frames[loop_at + 1][1]) if loop_at + 1 < len(frames) else ""
    for label, prefixes in _LOOSE:
        if any(first.startswith(p) or f"/{p}" in first for p in prefixes) or any(
            first.startswith("stdlib/" + p) for p in prefixes
        ):
            return label
    return "other callbacks"


def load(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.strip().rpartition(" ")
        if not count.isdigit():
            continue
        frames = [_parse(f) for f in body.split(";")]
        frames = [f for f in frames if f[1] or not re.match(r"^(process|thread) ", f[0])]
        stacks.append((frames, int(count)))
    return stacks


def summarize_file(path: Path, top: int = 25, us_per_request: float | None = None) -> str:
    stacks = load(Path(path))
    total = sum(c for _, c in stacks)
    if not total:
        return f"{path}: no samples"
    self_pkg: Counter[str] = Counter()
    self_mod: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        func, file = frames[-1]
        mod = module_of(file)
        if func in _LOOP_FRAMES or (func.startswith("<module>") and len(frames) <= 4):
            self_pkg["event loop (uvloop C: epoll, socket I/O, callbacks)"] += count
        else:
            self_pkg[package_of(mod)] += count
        self_mod[mod] += count
        self_fn[f"{func} ({mod})"] += count
        seen = set()
        for f, fl in frames:
            key = f"{f} ({module_of(fl)})"
            if key not in seen:
                seen.add(key)
                incl_fn[key] += count
        names = [f for f, _ in frames]
        for label, needles in STAGES:
            if any(any(n in name for n in needles) for name in names):
                stages[label] += count
                break
        else:
            stages[_loose_stage(frames)] += count

    def pct(n: int) -> str:
        us = f"  {n / total * us_per_request:6.0f} µs" if us_per_request else ""
        return f"{100 * n / total:5.1f}%{us}"

    def section(title: str, rows: Iterable[tuple[str, int]]) -> list[str]:
        return ["", title] + [f"  {pct(n)}  {k}" for k, n in rows]

    out = [f"{path.name}: {total} samples (non-idle)" + (f", {us_per_request:.0f} µs CPU per request" if us_per_request else "")]
    out += section("Stages of a request (first matching costproxy function on the stack):", stages.most_common())
    out += section("Self time by package:", self_pkg.most_common())
    out += section("Self time by module (top):", self_mod.most_common(top))
    own = [(k, n) for k, n in incl_fn.most_common() if "(proxy/" in k or "(bench/" in k]
    out += section("Inclusive time of costproxy / floor functions:", own[:top])
    notable = (
        "redis/",
        "prometheus_client/",
        "aiohttp/client",
        "web_response",
        "web_protocol",
        "http_writer",
        "uuid",
        "hashlib",
        "orjson",
    )
    libs = [(k, n) for k, n in incl_fn.most_common() if any(s in k for s in notable)]
    out += section("Inclusive time of library entry points (top):", libs[:top])
    out += section("Self time by function (top):", self_fn.most_common(top))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--us-per-request", type=float, default=None)
    args = parser.parse_args()
    for f in args.files:
        print(summarize_file(f, args.top, args.us_per_request))
        print()


if __name__ == "__main__":
    main()
