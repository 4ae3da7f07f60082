"""``python -m worklist [--config FILE]``: the worklist web app alone, with /healthz and /metrics (no model: no
questions). Signed reports are published to the io queue of the configured broker, where the pipeline's io
worker (``raddraft serve`` or ``raddraft worker --queues io``) delivers them."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from core.logsetup import configure_logging
from core.settings import load_settings
from workers.celery_app import configure
from worklist.service import WorklistService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worklist", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file (environment RADDRAFT_* wins)")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    configure_logging(settings.log_level)
    configure(settings)
    service = WorklistService(settings)
    try:
        service.start()
        threading.Event().wait()
    except KeyboardInterrupt:
        return 130
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
