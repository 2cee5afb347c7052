"""python -m devstack {install,up,down,status} [--profile dev|test] [--infra-only]"""

from __future__ import annotations

import argparse
import sys

from devstack import stack
from devstack.install import ensure_installed
from devstack.layout import layout
from devstack.proc import DevstackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.add_argument("command", choices=("install", "up", "down", "status"))
    parser.add_argument("--profile", choices=("dev", "test"), default=None,
                        help="dev (make up, the default) or test (ports +1000, .run/test)")
    parser.add_argument("--infra-only", action="store_true",
                        help="up: only Redis, PostgreSQL and Kafka")
    args = parser.parse_args(argv)
    lay = layout(args.profile)
    try:
        if args.command == "install":
            if not ensure_installed():
                print("devstack: everything is installed")
        elif args.command == "up":
            stack.up(lay, infra_only=args.infra_only)
        elif args.command == "down":
            stack.down(lay)
        else:
            states = stack.status(lay)  # exit 3: something runs but does not answer
            return 3 if any("NOT answering" in s for s in states.values()) else 0
    except DevstackError as exc:
        print(f"devstack[{lay.profile}]: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
