"""The test hosts of tests/sshd.py work for real: the ground the remote tests stand on.

Each test runs the real ``ssh`` client against a real ``sshd``; nothing here uses
trio_fork.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import sshd
from tests.helpers import dead_within, descendants, leftover_processes, process_alive
from tests.sshd import NetnsHost, SshServer, SshTarget


@pytest.mark.parametrize("ci", ["", "true"])
def test_without_openssh_the_tests_say_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setattr(sshd, "_SBIN_PATH", "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match=r"no sshd, ssh, ssh-keygen .*apt-get install openssh-server"):
        sshd.require_openssh()


def _ssh(target: SshTarget, command: str) -> str:
    run = subprocess.run(
        [*target.command, command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, f"ssh {command!r}: {run.returncode}, {run.stderr}"
    return run.stdout


# The Python that the remote tests run there: this one (a root filesystem of
# test-pythons may have no python3 command).
PYTHON = getattr(sys, "_base_executable", sys.executable)


def test_runs_python_on_the_server(ssh_target: SshTarget) -> None:
    out = _ssh(ssh_target, shlex.join([PYTHON, "-c", "import sys; print(sys.version_info[:2])"]))
    assert re.fullmatch(r"\(3, \d+\)\n", out)


def test_stdin_and_stdout_carry_binary_data(ssh_target: SshTarget) -> None:
    data = os.urandom(10 * 1024 * 1024)
    run = subprocess.run(
        [*ssh_target.command, "cat"], input=data, capture_output=True, timeout=60, check=True
    )
    assert run.stdout == data


def test_the_remote_side_sees_eof_when_the_client_is_killed(
    ssh_target: SshTarget, sshd_server: SshServer, tmp_path: Path
) -> None:
    # The remote side reads its stdin to the end, then says how much it read in a
    # file: its stdout has no reader any more by then.
    report = tmp_path / "report"
    script = (
        "import os, sys; print(os.getpid(), flush=True); data = sys.stdin.buffer.read(); "
        f"open({str(report)!r}, 'w').write(str(len(data)))"
    )
    command = [*ssh_target.command, shlex.join([PYTHON, "-c", script])]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    ) as client:
        assert client.stdin is not None
        assert client.stdout is not None
        remote = int(client.stdout.readline())
        # The server is no descendant of this process; what it runs for a test counts.
        assert sshd_server.pid not in descendants()
        assert remote in sshd_server.sessions()
        assert remote in leftover_processes(grace=0)
        client.stdin.write(b"abc")
        time.sleep(0.1)  # for the bytes to get there, not a wait for an event
        client.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        client.wait()
    while not report.exists() or process_alive(remote):
        assert time.monotonic() - killed < 5, "the remote side still reads after 5 s"
        time.sleep(0.01)
    assert report.read_text() == "3"


def test_a_server_ends_when_the_test_process_is_killed(tmp_path: Path) -> None:
    script = (
        "import sys, time; from pathlib import Path; from tests.sshd import running_sshd\n"
        f"with running_sshd(Path({str(tmp_path)!r})) as server:\n"
        "    print(server.pid, server.supervisor, flush=True); time.sleep(60)\n"
    )
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True
    ) as tests:
        assert tests.stdout is not None
        server = [int(pid) for pid in tests.stdout.readline().split()]
        assert all(process_alive(pid) for pid in server)
        tests.kill()
    assert dead_within(server, 5)


def _receive(stream: int, seconds: float) -> bytes:
    """What arrives on ``stream`` within ``seconds`` (b"" if nothing does)."""
    ready, _, _ = select.select([stream], [], [], seconds)
    return os.read(stream, 1024) if ready else b""


def _connecting(host: NetnsHost) -> subprocess.Popen[bytes]:
    """A new connection to ``host`` that gives up after 1 s without an answer."""
    return subprocess.Popen(
        [*host.target.ssh, "-o", "ConnectTimeout=1", host.target.destination, "true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _connects(host: NetnsHost) -> bool:
    with _connecting(host) as attempt:
        return attempt.wait(timeout=30) == 0


def test_netns_hosts_are_apart_and_a_dropping_link_keeps_connections(
    netns_hosts: list[NetnsHost],
) -> None:
    namespaces = {_ssh(host.target, "readlink /proc/self/ns/net") for host in netns_hosts}
    assert len(namespaces) == 2
    assert f"{os.readlink('/proc/self/ns/net')}\n" not in namespaces

    host = netns_hosts[0]
    with subprocess.Popen(
        [*host.target.command, "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    ) as session:
        assert session.stdin is not None
        assert session.stdout is not None
        session.stdin.write(b"before\n")
        assert _receive(session.stdout.fileno(), 10) == b"before\n"
        host.cut("drop")
        # The link stays cut for as short a time as the checks allow (about 1 s, the
        # connection timeout), so that TCP's next retransmission comes soon after.
        with _connecting(host) as attempt:
            session.stdin.write(b"during\n")
            assert _connects(netns_hosts[1])
            assert _receive(session.stdout.fileno(), 0.3) == b""
            assert attempt.wait(timeout=30) != 0
        # Neither side heard a FIN or an RST: once the packets flow again, the line
        # comes through the same connection.
        host.restore()
        assert _receive(session.stdout.fileno(), 10) == b"during\n"
        session.stdin.close()
        assert session.wait(timeout=10) == 0
    assert _connects(host)


def test_a_link_taken_down_fails_new_connections_at_once(
    netns_hosts: list[NetnsHost],
) -> None:
    host = netns_hosts[0]
    host.cut("down")
    started = time.monotonic()
    assert not _connects(host)
    assert time.monotonic() - started < 1
    host.restore()
    assert _connects(host)
