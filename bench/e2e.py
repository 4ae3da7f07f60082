"""Time from the last instance's C-STORE to the SR being in Orthanc: ``raddraft serve`` with its embedded
broker and model on the CPU, a real Orthanc as source and destination. Target: <= idle timeout + 5 s.

    .venv/bin/python bench/e2e.py [--modality CR|CT|MR] [--idle 1.0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from peers import Orthanc
from peers.gateway import MODEL, Phantoms, base_env, connect_orthanc, gateway, push_study, wait_for_outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=["CR", "CT", "MR"], default="CR")
    parser.add_argument("--idle", type=float, default=1.0, help="study idle timeout, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = Path(tmp)
        phantoms = Phantoms(root / "phantoms")
        with Orthanc(root / "orthanc") as orthanc:
            home = root / "home"
            env = base_env(home, RADDRAFT_STUDY_IDLE_SECONDS=str(args.idle),
                           RADDRAFT_DICOM_DESTINATIONS=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
            with gateway(home, env) as serve:
                connect_orthanc(orthanc, serve.port)
                study_id = push_study(orthanc, phantoms.files(args.modality))  # returns after the last C-STORE
                stored = time.monotonic()
                wait_for_outputs(orthanc, study_id, timeout=300)
                elapsed = time.monotonic() - stored
    target = args.idle + 5.0
    print(f"model {MODEL}, {args.modality}: last C-STORE -> SR in Orthanc {elapsed:.2f} s "
          f"(idle {args.idle:.1f} s; target <= {target:.1f} s: {'met' if elapsed <= target else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
