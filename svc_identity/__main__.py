"""python -m svc_identity [serve | create-admin | ensure-user | rotate-keys] (see commands.py)"""

import sys

from meshkit.server import main

from .bootstrap import create_server
from .commands import run
from .config import Settings

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv == ["serve"]:
        main(Settings, create_server)
    else:
        sys.exit(run(argv))
