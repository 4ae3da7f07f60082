"""The embedded broker: a ``redis-server`` that ``raddraft serve`` starts, owns and stops (issue 21).

With no ``broker_url``, serve runs Debian's ``/usr/bin/redis-server`` (``scripts/bootstrap.sh`` installs the
``redis-server`` package) with:

* a unix socket only (``port 0``; ``<home>/run/broker.sock``, mode 0700 in a 0700 folder): no TCP port to open;
* ``appendonly yes`` + ``appendfsync always``: Redis writes and fsyncs a command to its append-only file before
  it answers it, so a message the hand-off dispatcher saw accepted (LPUSH answered) survives a kill -9 of serve,
  of Redis, or of the machine; ``save ""`` (no RDB snapshots);
* AOF rewrites from ``embedded_broker_aof_rewrite_min_mb`` on (``auto-aof-rewrite-percentage 100``): the file
  is rewritten to what is in Redis (the messages queued or in flight) whenever it has doubled since the last
  rewrite; and serve calls :meth:`OwnedRedis.compact` every few seconds, which rewrites it as soon as it is over
  :data:`COMPACT_RATIO` times what Redis holds (a burst's messages delivered, the file still full of them). Its
  size follows what is in flight, not the history of every message ever delivered.

Ownership: serve holds an exclusive ``flock`` on ``<home>/broker/owner.lock`` for its lifetime, so a second serve
of the same home fails at start-up; a redis-server left by a serve that was killed (its pid in
``<home>/broker/redis.pid``, still running, a ``redis-server``) is shut down (SIGTERM: Redis flushes its file)
and replaced. The child gets SIGTERM when serve's thread that started it dies (``PR_SET_PDEATHSIG``), so a
killed serve leaves no Redis behind either.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

from core.settings import Settings

log = logging.getLogger(__name__)

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_PACKAGE = "redis-server"  # the Debian package (scripts/bootstrap.sh)
COMPACT_RATIO = 4  # compact() rewrites a file over this many times the data Redis holds (and over the minimum)
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path is 108 with its NUL)
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child between fork and exec only calls it


class BrokerStartError(RuntimeError):
    """The embedded broker cannot be started; the message says why and what to do."""


def _private_folder(folder: Path) -> None:
    """Make *folder* (the socket's: in the home, or under the temporary folder for a deep home) a real folder of
    this user only (0700); a symbolic link or a folder of another user there is refused, never used."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = os.lstat(folder)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
        raise BrokerStartError(f"the embedded broker's socket folder {folder} is not a folder of this user: "
                               "remove it, or choose another RADDRAFT_HOME or TMPDIR")
    os.chmod(folder, 0o700)


def _die_with_parent() -> None:
    """Run in the child between fork and exec: SIGTERM when the parent's thread that forked it ends."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent process ends (a child ``raddraft worker`` of serve); exit at
    once if the parent has already gone."""
    if _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        raise SystemExit(f"raddraft worker: its supervising process {parent_pid} has already ended")


def _is_redis(pid: int) -> bool:
    """*pid* is a running redis-server (a zombie, ended and not yet reaped, is not)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return comm.startswith("redis-server") and state != "Z"


def ping(socket_path: Path, timeout: float = 1.0) -> bool:
    """Redis answers PING on *socket_path*."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class OwnedRedis:
    """The redis-server of one ``RADDRAFT_HOME``: :meth:`start` (take ownership, replace a stale one, start,
    wait for PING), :meth:`stop` (SIGTERM, wait; Redis flushes its append-only file), :attr:`pid`."""

    def __init__(self, settings: Settings, executable: str = REDIS_SERVER) -> None:
        self.dir = settings.embedded_broker_dir.resolve()
        self.socket_path = settings.embedded_broker_socket  # absolute; not resolved: a link there is refused
        self.executable = executable
        self.aof_rewrite_min_bytes = int(settings.embedded_broker_aof_rewrite_min_mb * 1024 * 1024)
        self.config_path = self.dir / "redis.conf"
        self.pid_path = self.dir / "redis.pid"
        self.log_path = self.dir / "redis.log"
        self._lock: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> str:
        return "\n".join([
            "port 0",  # no TCP listener: the unix socket only
            f'unixsocket "{self.socket_path}"',
            "unixsocketperm 700",
            f'dir "{self.dir}"',
            f'pidfile "{self.pid_path}"',
            f'logfile "{self.log_path}"',
            "daemonize no",
            "appendonly yes",
            "appendfsync always",
            'appenddirname "appendonlydir"',
            'save ""',
            "auto-aof-rewrite-percentage 100",
            f"auto-aof-rewrite-min-size {self.aof_rewrite_min_bytes}",
            "aof-use-rdb-preamble yes",
            "databases 1",
            "",
        ])

    def start(self) -> None:
        if not os.access(self.executable, os.X_OK):
            found = shutil.which("redis-server")
            raise BrokerStartError(
                f"the embedded broker needs {self.executable} (Debian package {REDIS_PACKAGE}: "
                f"apt-get install {REDIS_PACKAGE}, or run scripts/bootstrap.sh)"
                + (f"; a redis-server was found at {found} but is not the packaged one" if found else "")
                + ", or set broker_url to an external Redis")
        if len(os.fsencode(self.socket_path)) > SUN_PATH_MAX:
            raise BrokerStartError(f"the embedded broker's socket path {self.socket_path} is longer than "
                                   f"{SUN_PATH_MAX} bytes (a unix socket's limit): choose a shorter RADDRAFT_HOME "
                                   "or TMPDIR")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        _private_folder(self.socket_path.parent)
        if self._lock is None:  # held from the first start to stop (a restart keeps it)
            self._take_ownership()
        self._replace_stale()
        self.config_path.write_text(self.config())
        # the append-only file is fsynced as each command is written; the log goes to redis.log
        self._process = subprocess.Popen([self.executable, str(self.config_path)], cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # noqa: PLW1509
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ping(self.socket_path):
            if self._process.poll() is not None:
                raise BrokerStartError(f"the embedded broker (redis-server) exited with code "
                                       f"{self._process.returncode} at start-up; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerStartError(f"the embedded broker did not answer on {self.socket_path} within "
                                       f"{START_TIMEOUT_S:.0f} s; see {self.log_path}")
            time.sleep(0.02)
        log.info("embedded broker: redis-server (pid %d) on %s, data in %s (append-only, fsync always)",
                 self._process.pid, self.socket_path, self.dir)

    def compact(self, wait_s: float = 0.0) -> bool:
        """Rewrite the append-only file (BGREWRITEAOF) if it is over :data:`COMPACT_RATIO` times the data Redis
        holds and over ``embedded_broker_aof_rewrite_min_mb``; True if a rewrite was started. With *wait_s*, wait
        up to that long for the rewrite to finish (serve does as it stops)."""
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=2.0)
        try:
            persistence = client.info("persistence")
            if persistence.get("aof_rewrite_in_progress") or persistence.get("aof_rewrite_scheduled"):
                return False
            size = int(persistence.get("aof_current_size", 0))
            held = int(client.info("memory").get("used_memory_dataset", 0))
            if size < max(self.aof_rewrite_min_bytes, COMPACT_RATIO * held):
                return False
            client.bgrewriteaof()
            log.info("embedded broker: append-only file %.1f MB for %.1f MB held: rewriting it", size / 1e6,
                     held / 1e6)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                persistence = client.info("persistence")
                if not (persistence.get("aof_rewrite_in_progress") or persistence.get("aof_rewrite_scheduled")):
                    break
                time.sleep(0.05)
            return True
        finally:
            client.close()

    def stop(self) -> None:
        """Shut the owned Redis down (SIGTERM: it writes and fsyncs its file, removes its socket) and let go of
        the home."""
        if self.running:
            try:  # what it holds once its workers have stopped, not the run's history
                self.compact(wait_s=STOP_TIMEOUT_S / 2)
            except redis.RedisError as exc:
                log.warning("the embedded broker's file was not compacted before it stopped: %s", exc)
        process, self._process = self._process, None
        if process is not None and process.poll() is not None:
            log.warning("the embedded broker had ended (%s)", process.returncode)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("the embedded broker (pid %d) did not stop within %.0f s: killed", process.pid,
                          STOP_TIMEOUT_S)
                process.kill()
                process.wait(timeout=10)
            log.info("embedded broker stopped")
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _take_ownership(self) -> None:
        lock = (self.dir / "owner.lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise BrokerStartError(f"another raddraft serve owns the embedded broker of {self.dir.parent} "
                                   f"({self.dir / 'owner.lock'} is locked): stop it first") from None
        self._lock = lock

    def _replace_stale(self) -> None:
        """A redis-server a killed serve left running on this home: shut it down (its data stays)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid > 0 and _is_redis(pid):
            log.warning("embedded broker: a redis-server (pid %d) of a previous serve still runs; shutting it "
                        "down and starting a new one (its queued messages are kept)", pid)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _is_redis(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _is_redis(pid):
                os.kill(pid, signal.SIGKILL)
                while _is_redis(pid):
                    time.sleep(0.05)
        self.pid_path.unlink(missing_ok=True)
        if self.socket_path.exists() and not ping(self.socket_path):
            self.socket_path.unlink()  # left by a Redis that was killed: it would refuse to bind
