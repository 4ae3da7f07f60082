"""``python -m worklist [--config FILE]``: the worklist web app with /healthz and /metrics (no model: no questions)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raddraft.http import respond
from raddraft.logsetup import configure_logging
from raddraft.settings import load_settings
from worklist.app import WorklistApp
from worklist.bridge import Bridge
from worklist.server import serve_forever
from worklist.storage import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worklist", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML settings file (environment RADDRAFT_* wins)")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    configure_logging(settings.log_level)
    store = Store.from_settings(settings)
    try:
        app = WorklistApp(Bridge(settings, store), ops=lambda method, path: respond(settings, method, path))
        serve_forever(app, settings.http_bind, settings.http_port)
    except KeyboardInterrupt:
        return 130
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
