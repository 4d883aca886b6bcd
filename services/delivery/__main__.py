"""``python -m services.delivery [serve|migrate]``: run the service or migrate its database."""

from __future__ import annotations

from services.delivery.server import spec
from services.runtime.app import main

if __name__ == "__main__":
    main(spec())
