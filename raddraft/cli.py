"""The ``raddraft`` console script: one sub-command per job, each in ``raddraft/commands/<name>.py``.

A command module provides ``add_arguments(parser)`` and ``run(args, settings) -> int``. Modules are imported
only when their command runs, so ``raddraft status`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from core.logsetup import configure_logging
from core.settings import load_settings
from raddraft import __version__

log = logging.getLogger(__name__)

COMMANDS: dict[str, str] = {
    "serve": "receive studies over DICOM, analyse them and deliver the results (embedded defaults)",
    "send": "send DICOM files or folders to a peer with C-STORE",
    "status": "list studies with their state and counts",
    "worker": "run a Celery worker for the io or gpu queue (production)",
    "retry": "re-play dead-lettered tasks",
    "phantoms": "generate synthetic phantom studies with ground truth",
    "train": "train the embedded model on phantom studies",
    "analyze": "run the model on one DICOM file",
    "evaluate": "measure the model on a phantom folder",
    "demo": "set up, run the gateway on bundled demo studies and print the drafts",
    "user": "manage worklist users",
}


def _available_commands() -> dict[str, str]:
    """Commands whose module exists in this checkout."""
    found = {}
    for name, help_text in COMMANDS.items():
        if importlib.util.find_spec(f"raddraft.commands.{name}") is not None:
            found[name] = help_text
    return found


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named in *argv* (the first word that is not an option or an option's value)."""
    takes_value = {"--config", "--log-level"}
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only *command*'s module is imported for its arguments (the others are listed)."""
    parser = argparse.ArgumentParser(prog="raddraft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"raddraft {__version__}")
    parser.add_argument("--config", type=Path, help="TOML settings file (environment RADDRAFT_* wins)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override log level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in _available_commands().items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(f"raddraft.commands.{name}").add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    overrides = {"log_level": args.log_level} if args.log_level else {}
    try:
        settings = load_settings(args.config, **overrides)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"raddraft: invalid settings: {exc}", file=sys.stderr)  # logging is not configured yet
        return 2
    configure_logging(settings.log_level)
    module = importlib.import_module(f"raddraft.commands.{args.command}")
    try:
        return int(module.run(args, settings) or 0)
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
