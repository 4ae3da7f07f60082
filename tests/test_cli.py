"""The console script: help, version, and settings errors reported without a traceback."""

import os
import socket
import subprocess
import sys

import raddraft


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "raddraft.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, check=False)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert raddraft.__version__ in result.stdout


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "send", "status", "worker"):
        assert command in result.stdout


def test_invalid_setting_is_reported_with_its_name(tmp_path):
    env = {**os.environ, "RADDRAFT_DICOM_PORT": "not-a-port", "RADDRAFT_HOME": str(tmp_path)}
    result = run_cli("status", env=env)
    assert result.returncode == 2
    assert "dicom_port" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_in_config_file_is_reported(tmp_path):
    config = tmp_path / "x.toml"
    config.write_text('ae_titel = "TYPO"\n')
    result = run_cli("--config", str(config), "status", env={**os.environ, "RADDRAFT_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "ae_titel" in result.stderr


def test_a_command_imports_only_its_own_module():
    # `raddraft analyze` must not pay for the gateway's imports (celery, the worklist, pynetdicom)
    probe = ("import sys; from raddraft.cli import build_parser; "
             "args = build_parser('analyze').parse_args(['--log-level', 'INFO', 'analyze', 'x.dcm', '--json']); "
             "print(args.command, args.json, sorted(m for m in ('celery', 'worklist.bridge', 'pynetdicom', "
             "'raddraft.commands.serve') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.split() == ["analyze", "True", "[]"]


def test_command_options_after_global_options_are_parsed():
    result = run_cli("--log-level", "WARNING", "analyze", "--help")
    assert result.returncode == 0
    assert "--prompt" in result.stdout


def test_retry_wants_exactly_one_kind_of_work(tmp_path):
    env = {**os.environ, "RADDRAFT_HOME": str(tmp_path)}
    for argv in ([], ["--all", "--stranded"], ["3", "--all"]):
        result = run_cli("retry", *argv, env=env)
        assert result.returncode == 2
        assert "give dead letter ids, --all or --stranded (one of them)" in result.stderr
    result = run_cli("retry", "--stranded", env=env)
    assert result.returncode == 2 and f"no index at {tmp_path}" in result.stderr


def test_worker_http_port_must_be_a_free_tcp_port(tmp_path):
    env = {**os.environ, "RADDRAFT_HOME": str(tmp_path)}
    result = run_cli("worker", "--queues", "io", "--http-port", "70000", env=env)
    assert result.returncode == 1 and "--http-port 70000 is not a TCP port" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("worker", "--queues", "io", "--http-port", str(port), env=env)
    assert result.returncode == 1 and f"cannot listen on http_bind 127.0.0.1 http_port {port}" in result.stderr
