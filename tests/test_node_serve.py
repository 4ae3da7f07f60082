"""``raddraft serve`` as a subprocess: kill -9 between instances loses no accepted instance; SIGTERM stops it."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading

from node_helpers import SCU_AE, make_ct, wait_for
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE

from dicom_node.index import EpisodeState, Index
from dicom_node.statuses import StoreStatus
from workers.manifest import StudyManifest
from workers.prepare import manifest_path


class Serve:
    """A ``raddraft serve`` process; its listening port is read from its INFO log."""

    def __init__(self, home, **env):
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}
        environment.update({"RADDRAFT_HOME": str(home), "RADDRAFT_DICOM_PORT": "0",
                            "RADDRAFT_DICOM_BIND": "127.0.0.1", "RADDRAFT_MIN_FREE_DISK_MB": "0", **env})
        self.process = subprocess.Popen([sys.executable, "-m", "raddraft.cli", "serve"], env=environment,
                                        stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.port: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: self.port or self.process.poll() is not None, timeout=60, what="serve listening")
        assert self.port, "".join(self.log)

    def _read(self):
        for line in self.process.stderr:
            self.log.append(line)
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))

    def associate(self):
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="RADDRAFT")
        assert assoc.is_established
        return assoc

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=10)
        return code


def test_kill_9_between_instances_loses_no_accepted_instance_and_restart_prepares_the_study(tmp_path):
    home = tmp_path / "home"
    study, series = generate_uid(), generate_uid()
    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="30")
    try:
        assoc = serve.associate()
        accepted = []
        for z in range(5):
            ds = make_ct(study, series, position=float(z), instance_number=z + 1)
            assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
            accepted.append(ds.SOPInstanceUID)
        serve.process.kill()  # SIGKILL with the association still open, between two instances
        assert serve.process.wait(timeout=30) == -signal.SIGKILL
        assoc.abort()
    finally:
        serve.stop(signal.SIGKILL)

    index = Index(home / "index.sqlite")
    for sop in accepted:
        record = index.instance(sop)
        assert record is not None, sop
        assert hashlib.sha256((home / "spool" / record.path).read_bytes()).hexdigest() == record.sha256
    index.close()

    restarted = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="0.5")
    try:
        index = Index(home / "index.sqlite")
        wait_for(lambda: (e := index.episode(study, 1)) is not None and e.state == EpisodeState.PREPARED,
                 timeout=60, what="study prepared after restart")
        manifest = StudyManifest.read(manifest_path(home, study, 1))
        assert [i.sop_instance_uid for i in manifest.series[0].instances] == accepted
        assert index.task_runs(study, 1) == [("prepare", "prepared")]
        index.close()
    finally:
        code = restarted.stop()
    assert code == 0, "".join(restarted.log)
    log = "".join(restarted.log)
    assert "raddraft stopped" in log
    assert "NODE-PID-1" not in log and "Node^Test" not in log  # no patient identifiers at INFO


def test_status_command_reports_states(tmp_path):
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}, "RADDRAFT_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "raddraft.cli", "status"], env=env, check=False,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "no studies" in result.stdout
