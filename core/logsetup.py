"""Logging set-up for raddraft processes (library code only ever calls ``logging.getLogger``)."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send records of *level* and above to stderr; quieten chatty libraries at INFO."""
    logging.basicConfig(level=level, format=_FORMAT, stream=sys.stderr, force=True)
    # pynetdicom logs every PDU and, at INFO, patient-identifying request identifiers.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    for noisy in ("celery", "kombu", "amqp", "urllib3", "httpx", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
