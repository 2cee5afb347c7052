"""Run wrk against loopback and read its figures (requests/s, latency percentiles)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class Result:
    name: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    errors: int
    # Responses per HTTP status, when run(count_statuses=True) asked wrk's script to count them.
    statuses: dict[int, int] = field(default_factory=dict)

    def row(self, baseline: Result | None = None) -> str:
        ratio = f"{self.requests_per_second / baseline.requests_per_second:6.2f}" if baseline else "   -  "
        answers = ("  statuses " + " ".join(f"{k}:{v}" for k, v in sorted(self.statuses.items()))
                   if self.statuses else f"  non-2xx {self.non_2xx}")
        return (f"{self.name:<34} {self.requests_per_second:>10.0f} req/s  p50 {self.p50_ms:7.2f} ms"
                f"  p99 {self.p99_ms:7.2f} ms  ratio {ratio}{answers}")


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


# Counts responses per status in every thread; done() prints the sums as "status <code> <n>".
_COUNT_STATUSES = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do total[code] = (total[code] or 0) + n end
  end
  for code, n in pairs(total) do io.write(string.format("status %d %d\\n", code, n)) end
end
"""


def _lua(method: str, body: str | None, headers: dict[str, str],
         rotate: tuple[str | Sequence[str], Path] | None = None, body_script: str | None = None,
         count_statuses: bool = False) -> str:
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines.append(f"wrk.body = [[{body}]]")
    for k, v in headers.items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    per_request: list[str] = []
    if rotate is not None:
        # One line per request, in turn, from a file; a line holds one value per header,
        # tab-separated (e.g. many fans' user token and admission token).
        names, path = rotate
        names = (names,) if isinstance(names, str) else tuple(names)
        lines += [
            "local rows, i = {}, 0",
            f'for line in io.lines("{path}") do',
            "  local row = {}",
            '  for v in (line .. "\\t"):gmatch("([^\\t]*)\\t") do row[#row + 1] = v end',
            "  rows[#rows + 1] = row",
            "end",
        ]
        per_request += ["  i = i % #rows + 1"]
        per_request += [f'  wrk.headers["{h}"] = rows[i][{n}]' for n, h in enumerate(names, 1)]
    if body_script is not None:
        lines.append(body_script)  # defines body(): each request's body
        per_request.append("  wrk.body = body()")
    if per_request:
        lines += ["request = function()", *per_request, "  return wrk.format()", "end"]
    if count_statuses:
        lines.append(_COUNT_STATUSES)
    return "\n".join(lines) + "\n"


def run(name: str, url: str, *, seconds: int = 5, connections: int = 50, threads: int = 1,
        method: str = "GET", body: str | None = None,
        headers: dict[str, str] | None = None, rotate: tuple[str | Sequence[str], Path] | None = None,
        body_script: str | None = None, count_statuses: bool = False) -> Result:
    """rotate=(header, file): each request sends the next line of file as that header;
    rotate=((header, header2, ...), file): the next line holds tab-separated values, one for each.
    body_script: Lua defining ``function body()``, called for each request's body (random seats).
    count_statuses: Result.statuses holds the responses per status (a 409 is an answer)."""
    host = urlparse(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.")):
        raise ValueError(f"benchmarks only target loopback, not {host}")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is missing: `make install` (Debian package wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_lua(method, body, headers or {}, rotate, body_script, count_statuses))
    try:
        out = subprocess.run(
            [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
             "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + 30, check=True,
        ).stdout
    finally:
        Path(script.name).unlink(missing_ok=True)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Result(
        name=name, requests_per_second=rps, p50_ms=_ms(pct.get("50", "")),
        p99_ms=_ms(pct.get("99", "")), requests=total,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        errors=sum(int(x) for x in errs.groups()) if errs else 0,
        statuses={int(c): int(n) for c, n in re.findall(r"^status (\d+) (\d+)$", out, re.M)},
    )
