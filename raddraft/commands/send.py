"""``raddraft send PATH… --to AET@host:port``: C-STORE files and folders to a DICOM peer.

Folders are searched recursively; files that are not DICOM (and DICOMDIRs) are skipped with a warning. Each
instance is sent in its stored transfer syntax (see ``dicom_node.scu``). Exit code 0 when every instance was
stored (warnings included), 1 when any failed or could not be read, 3 when the peer could not be reached or
refused the association.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from pathlib import Path

from tqdm import tqdm

from core.settings import Destination, Settings, validate_ae_title
from dicom_node.scu import InstanceResult, Outcome, SendError, prepare, send_instances

log = logging.getLogger(__name__)

EXIT_FAILED_INSTANCES = 1
EXIT_PEER_UNAVAILABLE = 3
_MAX_LISTED_FAILURES = 20


def _destination(text: str) -> Destination:
    try:
        return Destination.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _ae_title(text: str) -> str:
    try:
        return validate_ae_title(text, "--calling-aet")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders (recursive)")
    parser.add_argument("--to", required=True, type=_destination, metavar="AET@HOST:PORT", help="the C-STORE SCP")
    parser.add_argument("--calling-aet", type=_ae_title, help="our AE title (default: the ae_title setting)")
    parser.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM CA bundle: connect with TLS, verify the peer")
    parser.add_argument("--timeout", type=float, help="seconds to wait for each reply (default: network_timeout_s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _tls_context(ca_file: Path) -> ssl.SSLContext:
    if not ca_file.is_file():
        raise FileNotFoundError(f"--tls-ca {ca_file} does not exist")
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))


def run(args: argparse.Namespace, settings: Settings) -> int:
    destination: Destination = args.to
    try:
        tls_context = _tls_context(args.tls_ca) if args.tls_ca else None
    except (FileNotFoundError, ssl.SSLError) as exc:
        sys.stderr.write(f"raddraft send: {exc}\n")
        return 2

    plan = prepare(args.paths)
    total = len(plan.instances) + len(plan.unreadable)
    with tqdm(total=total, unit="inst", file=sys.stderr, disable=args.no_progress or None, leave=False) as bar:

        failures = 0

        def progress(result: InstanceResult) -> None:
            nonlocal failures
            bar.update(1)
            if result.outcome is Outcome.FAILURE:
                failures += 1
                bar.set_postfix(failed=failures)

        try:
            summary = send_instances(
                destination,
                plan,
                calling_ae_title=args.calling_aet or settings.ae_title,
                tls_context=tls_context,
                timeout_s=args.timeout or settings.network_timeout_s,
                progress=progress,
            )
        except SendError as exc:
            bar.close()
            sys.stderr.write(f"raddraft send: {exc}\n")
            return EXIT_PEER_UNAVAILABLE

    for skipped in summary.skipped:
        sys.stderr.write(f"skipped {skipped.path}: {skipped.reason}\n")
    for failed in summary.failed[:_MAX_LISTED_FAILURES]:
        sys.stderr.write(f"FAILED {failed.source}: {failed.reason}\n")
    if len(summary.failed) > _MAX_LISTED_FAILURES:
        sys.stderr.write(f"… and {len(summary.failed) - _MAX_LISTED_FAILURES} more failures\n")
    for warned in summary.warnings[:_MAX_LISTED_FAILURES]:
        sys.stderr.write(f"warning {warned.source}: {warned.reason}\n")
    sys.stdout.write(f"sent {summary.describe()}\n")
    return 0 if summary.ok else EXIT_FAILED_INSTANCES

