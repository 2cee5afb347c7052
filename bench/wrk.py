"""Run wrk against loopback and read its figures (requests/s, latency percentiles)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
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

    def row(self, baseline: Result | None = None) -> str:
        ratio = f"{self.requests_per_second / baseline.requests_per_second:6.2f}" if baseline else "   -  "
        return (f"{self.name:<34} {self.requests_per_second:>10.0f} req/s  p50 {self.p50_ms:7.2f} ms"
                f"  p99 {self.p99_ms:7.2f} ms  ratio {ratio}  non-2xx {self.non_2xx}")


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def _lua(method: str, body: str | None, headers: dict[str, str],
         rotate: tuple[str, Path] | None = None) -> str:
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines.append(f"wrk.body = [[{body}]]")
    for k, v in headers.items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    if rotate is not None:
        # One header value per request, in turn, from a file (e.g. many fans' tokens).
        header, path = rotate
        lines += [
            "local values, i = {}, 0",
            f'for line in io.lines("{path}") do values[#values + 1] = line end',
            "request = function()",
            "  i = i % #values + 1",
            f'  wrk.headers["{header}"] = values[i]',
            "  return wrk.format()",
            "end",
        ]
    return "\n".join(lines) + "\n"


def run(name: str, url: str, *, seconds: int = 5, connections: int = 50, threads: int = 1,
        method: str = "GET", body: str | None = None,
        headers: dict[str, str] | None = None, rotate: tuple[str, Path] | None = None) -> Result:
    """rotate=(header, file): each request sends the next line of file as that header."""
    host = urlparse(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.")):
        raise ValueError(f"benchmarks only target loopback, not {host}")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is missing: `make install` (Debian package wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_lua(method, body, headers or {}, rotate))
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
    )
