"""python -m svc_catalog"""

from meshkit.server import main

from .bootstrap import create_server
from .config import Settings

if __name__ == "__main__":
    main(Settings, create_server)
