"""The embedded default (issue 21): ``raddraft serve`` with no ``broker_url`` owns a redis-server on a unix socket
(workers/owned_redis.py) and runs its io and gpu workers as child processes (workers/supervisor.py). Real
processes, real signals: kill -9 of serve, of its Redis and of a worker; the broker's files after many studies."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from node_helpers import Serve, make_ct, wait_for
from pydicom.uid import generate_uid
from test_node_serve_ops import get, status, worklist_url

from core.settings import Settings
from dicom_node.statuses import StoreStatus
from state.store import StateStore
from workers.owned_redis import BrokerStartError, OwnedRedis, ping

FINAL = {"reported", "delivered", "not-analysed", "failed"}  # "reported": no destination configured


def redis_pid(home: Path) -> int:
    """The owned Redis's pid from its pid file; 0 without one (Redis removes it as it stops)."""
    try:
        return int((home / "broker" / "redis.pid").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def running(pid: int) -> bool:
    """*pid* is a live process (a zombie, killed and not yet reaped, does not count)."""
    if pid <= 0:
        return False
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def redis_command(home: Path, *words: str) -> bytes:
    """One command to the owned Redis on its socket (RESP), its raw answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(home / "run" / "broker.sock"))
        sock.sendall(f"*{len(words)}\r\n".encode() + b"".join(
            f"${len(w)}\r\n{w}\r\n".encode() for w in words))
        return sock.recv(65536)


def aof_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "broker" / "appendonlydir").iterdir())


def worker_pids(home: Path) -> dict[str, int | None]:
    document = json.loads(status(home, "--json"))["inprocess_worker"]
    return {child["queue"]: child["pid"] for child in document["workers"]}


def send_studies(serve: Serve, count: int) -> list[str]:
    studies = [generate_uid() for _ in range(count)]
    assoc = serve.associate()
    for study in studies:
        assert assoc.send_c_store(make_ct(study, generate_uid())).Status == StoreStatus.SUCCESS
    assoc.release()
    return studies


def states(home: Path, studies: list[str]) -> list[str | None]:
    store = StateStore(home / "index.sqlite")
    try:
        found = [store.episode(study, 1) for study in studies]
    finally:
        store.close()
    return [None if episode is None else str(episode.state) for episode in found]


def test_serve_owns_its_redis_on_a_private_socket_and_leaves_nothing_running(tmp_path):
    home = tmp_path / "home"
    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="3600")
    try:
        pid = redis_pid(home)
        assert running(pid) and Path(f"/proc/{pid}/comm").read_text().strip() == "redis-server"
        sock = home / "run" / "broker.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o700
        assert stat.S_IMODE((home / "run").stat().st_mode) == 0o700
        assert b"+PONG" in redis_command(home, "PING")
        config = redis_command(home, "CONFIG", "GET", "*").decode()
        for key, value in (("port", "0"), ("appendonly", "yes"), ("appendfsync", "always"), ("save", "")):
            assert f"\r\n{key}\r\n${len(value)}\r\n{value}\r\n" in config, key  # no TCP port; fsync always
        workers = wait_for(lambda: (p := worker_pids(home)) and all(p.values()) and p, timeout=30, what="workers")
        assert set(workers) == {"io", "gpu"} and all(running(p) for p in workers.values())
        lines = status(home)
        assert "io worker process: running since " in lines and "gpu worker process: running since " in lines

        # a second serve of the same home is refused at start-up, with the reason
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RADDRAFT_")}, "RADDRAFT_HOME": str(home),
               "RADDRAFT_DICOM_PORT": "0", "RADDRAFT_HTTP_PORT": "0", "RADDRAFT_MIN_FREE_DISK_MB": "0"}
        second = subprocess.run([sys.executable, "-m", "raddraft.cli", "serve"], env=env, capture_output=True,
                                text=True, timeout=60, check=False)
        assert second.returncode != 0
        assert "another raddraft serve owns the embedded broker" in second.stderr
        assert running(pid)  # and the running one's Redis is untouched
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)
    assert not running(pid) and not sock.exists()
    assert not any(running(p) for p in workers.values() if p)
    assert "io worker process: stopped since " in status(home)


def test_a_killed_worker_process_is_restarted_then_left_dead_and_healthz_says_so(tmp_path):
    home = tmp_path / "home"
    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="3600", RADDRAFT_INPROCESS_WORKER_MAX_RESTARTS="1",
                  RADDRAFT_INPROCESS_WORKER_RESTART_BACKOFF_S="0.5")
    try:
        url = worklist_url(serve)
        wait_for(lambda: get(f"{url}/healthz")[0] == 200, timeout=60, what="healthy gateway")
        first = wait_for(lambda: worker_pids(home)["io"], timeout=30, what="io worker")
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: (p := worker_pids(home)["io"]) and p != first and p, timeout=30,
                          what="io worker restarted")
        assert get(f"{url}/healthz")[0] == 200  # restarted within its bound
        (line,) = [line for line in status(home).splitlines() if line.startswith("io worker process:")]
        assert line.startswith("io worker process: running since ") and "1 restart(s)" in line

        os.kill(second, signal.SIGKILL)  # a second death in a row: more than max_restarts=1
        wait_for(lambda: get(f"{url}/healthz")[0] == 503, timeout=30, what="/healthz 503")
        (line,) = [line for line in status(home).splitlines() if line.startswith("io worker process:")]
        assert line.startswith("io worker process: dead since ") and "after 1 restart(s) (killed by SIGKILL)" in line
        assert "gpu worker process: running since " in status(home)  # the other one is not touched
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)
    log = "".join(serve.log)
    assert "io worker died (killed by SIGKILL); restarting it in 0.5 s (restart 1 of at most 1 in a row)" in log
    assert "io worker died (killed by SIGKILL) 2 time(s) in a row: not restarted again" in log


def test_kill_9_of_serve_and_of_its_redis_loses_nothing_queued_and_work_resumes(tmp_path):
    home = tmp_path / "home"
    # no workers: the hand-off dispatcher publishes, nothing consumes; every message is queued in the owned Redis
    serve = Serve(home, "--no-worker", RADDRAFT_STUDY_IDLE_SECONDS="0.5")
    try:
        studies = send_studies(serve, 6)
        wait_for(lambda: states(home, studies) == ["queued"] * 6, timeout=30, what="episodes queued")

        def depth() -> int:
            return int(redis_command(home, "LLEN", "io").decode().strip().lstrip(":"))

        wait_for(lambda: depth() == 6, timeout=30, what="six prepare messages in Redis")
        before = redis_pid(home)
        os.kill(before, signal.SIGKILL)  # the broker dies: serve starts it again, the AOF (fsync always) has all
        wait_for(lambda: (p := redis_pid(home)) != before and running(p), timeout=30, what="redis started again")
        wait_for(lambda: depth() == 6, timeout=30, what="the queue after the Redis restart")
        killed_redis = redis_pid(home)
    finally:
        serve.process.kill()  # kill -9 of serve: its Redis gets SIGTERM (PR_SET_PDEATHSIG)
        serve.process.wait(timeout=30)
    log = "".join(serve.log)
    assert "the embedded broker (redis-server) ended; starting it again" in log
    wait_for(lambda: not running(killed_redis), timeout=30, what="the killed serve's Redis gone")

    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="0.5")  # restarted, with its workers
    try:
        wait_for(lambda: set(states(home, studies)) <= FINAL, timeout=240, interval=0.5, what="every study done")
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)


def test_kill_9_of_serve_mid_work_puts_what_its_workers_held_back_at_once(tmp_path):
    """The visibility timeout is an hour: after the restart nothing waits for it, the held messages are restored."""
    home = tmp_path / "home"
    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="0.5", RADDRAFT_BROKER_VISIBILITY_TIMEOUT_S="3600")
    studies = send_studies(serve, 8)
    try:
        wait_for(lambda: any(s not in (None, "receiving", "queued") for s in states(home, studies)), timeout=120,
                 interval=0.02, what="work started")
    finally:
        serve.process.kill()
        serve.process.wait(timeout=30)
    left = [s for s in states(home, studies) if s not in FINAL]
    assert left, "everything finished before the kill: nothing was in flight"

    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="0.5", RADDRAFT_BROKER_VISIBILITY_TIMEOUT_S="3600")
    try:
        wait_for(lambda: set(states(home, studies)) <= FINAL, timeout=240, interval=0.5, what="every study done")
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)


def test_the_broker_files_follow_what_is_in_flight_not_the_history(tmp_path):
    home = tmp_path / "home"
    serve = Serve(home, RADDRAFT_STUDY_IDLE_SECONDS="0.5", RADDRAFT_EMBEDDED_BROKER_AOF_REWRITE_MIN_MB="0.02")
    try:
        studies: list[str] = []
        for _ in range(4):
            batch = send_studies(serve, 8)
            studies += batch
            wait_for(lambda b=batch: set(states(home, b)) <= FINAL, timeout=240, interval=0.5, what="batch done")
        time.sleep(1.0)  # a rewrite the last writes started has finished
        info = redis_command(home, "INFO", "persistence").decode()
        stats = redis_command(home, "INFO", "stats").decode()
        written = int(next(line.split(":")[1] for line in stats.splitlines()
                           if line.startswith("total_net_input_bytes:")))
        rewrites = int(next(line.split(":")[1] for line in info.splitlines()
                            if line.startswith("aof_rewrites:")))
        size = aof_bytes(home)
        keys = int(redis_command(home, "DBSIZE").decode().strip().lstrip(":"))
    finally:
        code = serve.stop()
    assert code == 0, "".join(serve.log)
    assert rewrites >= 1
    # 32 studies went through: the file holds what is left (bindings, nothing queued), not every message
    assert size < 3 * 0.02 * 1024 * 1024 + 16384 and size < written / 4, (size, written)
    assert keys < 20, keys


def test_without_redis_server_start_up_says_why(tmp_path):
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(BrokerStartError, match=r"needs /nonexistent/redis-server \(Debian package redis-server: "
                                               r"apt-get install redis-server"):
        OwnedRedis(settings, executable="/nonexistent/redis-server").start()



def test_a_home_too_deep_for_a_unix_socket_gets_a_private_socket_folder_under_the_temporary_folder(tmp_path):
    """A socket's path is at most 107 bytes: a deep home (a test's or a bench's folder, a deep mount) put the
    socket in a private folder of the temporary folder instead of refusing to start; a folder there that is a
    link, or not this user's, is refused."""
    long_home = Settings(home=tmp_path / ("h" * 120))
    socket_path = long_home.embedded_broker_socket
    assert len(os.fsencode(socket_path)) <= 107 and long_home.home.resolve() not in socket_path.parents
    assert socket_path == Settings(home=tmp_path / ("h" * 120)).embedded_broker_socket  # the same home, the same
    assert socket_path != Settings(home=tmp_path / ("g" * 120)).embedded_broker_socket
    owned = OwnedRedis(long_home)
    owned.start()
    try:
        assert ping(socket_path)
        folder = os.lstat(socket_path.parent)
        assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    finally:
        owned.stop()


def test_a_socket_folder_that_is_a_link_is_refused(tmp_path, monkeypatch):
    short_tmp = tmp_path / "t"
    short_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(short_tmp))  # the temporary folder this test's deep home uses
    deep = Settings(home=tmp_path / ("k" * 120))
    folder = deep.embedded_broker_socket.parent
    assert folder.parent == short_tmp
    (tmp_path / "elsewhere").mkdir()
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BrokerStartError, match="is not a folder of this user"):
        OwnedRedis(deep).start()


def test_a_redis_left_running_by_a_previous_serve_is_replaced_and_its_data_kept(tmp_path):
    settings = Settings(home=tmp_path / "home")
    first = OwnedRedis(settings)
    first.start()
    try:
        assert redis_command(settings.home, "LPUSH", "io", "queued-before") == b":1\r\n"
    finally:
        first.stop()
    # a redis-server of that home still running without its serve (as if serve died and the signal was lost)
    leftover = subprocess.Popen(["/usr/bin/redis-server", str(first.config_path)], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: redis_pid(settings.home) == leftover.pid, timeout=20, what="leftover Redis up")
        second = OwnedRedis(settings)
        second.start()
        try:
            assert leftover.wait(timeout=30) == 0  # shut down cleanly (SIGTERM), not killed
            assert second.pid != leftover.pid and redis_pid(settings.home) == second.pid
            assert b"queued-before" in redis_command(settings.home, "LRANGE", "io", "0", "-1")
        finally:
            second.stop()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait(timeout=10)
