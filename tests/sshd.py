"""Real OpenSSH servers for the tests of remote templates.

A remote template is only as good as its behaviour over the real ``ssh`` client and a
real ``sshd``, so the tests run both: no mock transport. Two kinds of test host:

- one sshd for the whole session on 127.0.0.1 and a free port (the ``sshd_server`` and
  ``ssh_target`` fixtures);
- hosts in network namespaces (``open_netns_hosts``, the ``netns_hosts`` fixture): each
  is joined to this namespace by a veth pair, runs its own sshd on its own address, and
  has a link that can be cut, so that packets vanish and neither side sees FIN or RST,
  and restored.

Keys and configuration are made per server in a temporary directory and removed with
it: a host key, a client key, an sshd_config, and a client config with its known_hosts,
so that ``ssh -F config host`` reads nothing of the user's or the system's ssh setup.

The servers run in the foreground (``sshd -D``), each the child of a small supervisor
(tests/scripts/detached.py) that is no descendant of the test process: a server that
lives through many tests is not among the ``descendants()`` that tests and the leak
check count. The supervisor ends its server when the test process closes its end of a
pipe, or dies. What a server runs for a client (the remote side of a test) is below it:
``SshServer.sessions()``; ``leftover_processes()`` of tests/helpers.py counts it too,
giving it a moment to end after its client.

Without ``sshd`` or ``ssh`` the fixtures skip, saying how to install them; under
``CI=true`` they fail instead, since ``.ci/run`` installs them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NoReturn

import attrs
import pytest

from tests.helpers import dead_within, descendants, process_alive, session_processes

INSTALL_HINT = "apt-get install openssh-server openssh-client"

# sshd needs an absolute path (it re-executes itself), and /usr/sbin is not on every
# user's PATH.
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])

# Options that only newer sshd versions know, each left out where sshd refuses it.
# Since OpenSSH 9.8 sshd refuses connections for a while from an address whose earlier
# connections failed to authenticate, which the tests of cut links do on purpose.
_NEWER_OPTIONS = {"PerSourcePenalties": "no"}

_DETACHED = Path(__file__).resolve().parent / "scripts" / "detached.py"

# Test hosts in network namespaces take /30 networks in 198.18.0.0/15, the range set
# aside for network tests (RFC 2544): this namespace's end .1, the host's end .2.
_TEST_RANGE = ipaddress.IPv4Network("198.18.0.0/15")

_host_numbers = itertools.count(1)


def _unavailable(reason: str) -> NoReturn:
    """Skip; or fail under CI=true, where .ci/run installs everything the tests need."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, where these tests must run)", pytrace=False)
    pytest.skip(reason)


@attrs.frozen
class OpenSSH:
    """Where OpenSSH's programs are."""

    sshd: str
    ssh: str
    keygen: str


def find_openssh() -> OpenSSH | str:
    """OpenSSH's programs, or a message that says which are missing and how to get them."""
    found = {
        "sshd": shutil.which("sshd", path=_SBIN_PATH),
        "ssh": shutil.which("ssh"),
        "ssh-keygen": shutil.which("ssh-keygen"),
    }
    missing = [name for name, path in found.items() if path is None]
    if missing:
        return (
            f"no {', '.join(missing)} on this machine: to run the tests with a real sshd, "
            f"{INSTALL_HINT} (as root; .ci/run does it)"
        )
    return OpenSSH(
        sshd=os.path.abspath(found["sshd"] or ""),
        ssh=found["ssh"] or "",
        keygen=found["ssh-keygen"] or "",
    )


def require_openssh() -> OpenSSH:
    """OpenSSH's programs; skip the test without them (fail under CI=true)."""
    found = find_openssh()
    if isinstance(found, str):
        _unavailable(found)
    return found


@attrs.frozen
class SshTarget:
    """What a client needs to reach one test sshd.

    ``ssh`` is the client command without the destination (``["ssh", "-F", config]``),
    ``command`` the same with it: ``[*target.command, "true"]`` runs ``true`` there.
    """

    destination: str
    config: Path
    address: str
    port: int
    user: str
    identity: Path
    known_hosts: Path

    @property
    def ssh(self) -> list[str]:
        return ["ssh", "-F", str(self.config)]

    @property
    def command(self) -> list[str]:
        return [*self.ssh, self.destination]


@attrs.define(eq=False)
class SshServer:
    """One running test sshd (``sshd -D``), apart from the test process.

    ``pid`` is the sshd's; ``supervisor`` is the process of tests/scripts/detached.py
    whose child it is, and ``control`` the descriptor that keeps the two running.
    """

    target: SshTarget
    pid: int
    supervisor: int
    control: int
    log_path: Path

    def sessions(self) -> dict[int, str]:
        """What the server runs for its clients now: every process below it."""
        return descendants(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _keygen(openssh: OpenSSH, path: Path, comment: str) -> str:
    """A new ed25519 key without a passphrase at ``path``; its public line."""
    subprocess.run(
        [openssh.keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return Path(f"{path}.pub").read_text().strip()


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


def _privilege_separation_directory() -> None:
    """sshd started as root refuses to run without it; Debian's service makes it."""
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def _sshd_config(
    *, address: str, port: int, host_key: Path, authorized_keys: Path, user: str
) -> list[str]:
    return [
        "# Written by tests/sshd.py for one test server.",
        f"ListenAddress {address}",
        f"Port {port}",
        "AddressFamily inet",
        f"HostKey {host_key}",
        "PidFile none",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {user}",
        # The keys live in a temporary directory under /tmp, world-writable, which
        # StrictModes refuses.
        "StrictModes no",
        # The tests run as root in CI: a key login, never a password.
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "UseDNS no",
        "PermitUserEnvironment no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "AllowTcpForwarding no",
        "AllowStreamLocalForwarding no",
        "PermitTunnel no",
        # Many connections at once from the tests must not be dropped at random (the
        # default, 10:30:100, drops some beyond 10 unauthenticated ones).
        "MaxStartups 1000",
        "MaxSessions 100",
        "LogLevel VERBOSE",
    ]


def _client_config(
    *, alias: str, address: str, port: int, user: str, identity: Path, known_hosts: Path
) -> str:
    lines = [
        "# Written by tests/sshd.py: ssh -F this-file " + alias,
        f"Host {alias}",
        f"  HostName {address}",
        f"  Port {port}",
        f"  User {user}",
        f"  IdentityFile {identity}",
        "  IdentitiesOnly yes",
        "  IdentityAgent none",
        f"  HostKeyAlias {alias}",
        f"  UserKnownHostsFile {known_hosts}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  UpdateHostKeys no",
        "  CheckHostIP no",
        "  BatchMode yes",
        "  ConnectTimeout 10",
        "  ControlMaster no",
        "  ControlPath none",
        "  ForwardAgent no",
        "  ForwardX11 no",
        "  RequestTTY no",
        # Binary data on stdin must pass untouched (there is no escape without a tty
        # either, but say so).
        "  EscapeChar none",
        "  LogLevel ERROR",
    ]
    return "\n".join(lines) + "\n"


def _write_sshd_config(openssh: OpenSSH, path: Path, lines: list[str]) -> None:
    """Write the config, leaving out the newer options this sshd does not know."""
    options = dict(_NEWER_OPTIONS)
    while True:
        path.write_text("\n".join([*lines, *(f"{k} {v}" for k, v in options.items())]) + "\n")
        check = subprocess.run(
            [openssh.sshd, "-t", "-f", str(path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if check.returncode == 0:
            return
        refused = [k for k in options if re.search(rf"\b{k}\b", check.stderr)]
        if not refused:
            raise RuntimeError(f"sshd refuses its test config {path}:\n{check.stderr}")
        for key in refused:
            del options[key]


def _start_detached(command: list[str], log_path: Path) -> tuple[int, int, int]:
    """Start ``command`` under tests/scripts/detached.py: (supervisor, pid, control).

    Neither process is a descendant of this one, so the checks of ``descendants()`` in
    the tests do not count them. Closing ``control`` ends them, and so does the end of
    this process, however it ends.
    """
    control_read, control = os.pipe()
    try:
        with (
            open(log_path, "ab") as log,
            subprocess.Popen(
                [sys.executable, str(_DETACHED), *command],
                stdin=control_read,
                stdout=subprocess.PIPE,
                stderr=log,
            ) as launcher,
        ):
            assert launcher.stdout is not None
            line = launcher.stdout.readline()
        if not line:
            raise RuntimeError(f"{_DETACHED} did not start {command}; see {log_path}")
    except BaseException:
        os.close(control)
        raise
    finally:
        os.close(control_read)
    supervisor, pid = (int(field) for field in line.split())
    return supervisor, pid, control


def _wait_listening(server: SshServer, address: str, port: int) -> bool:
    """Whether the server came to listen (False: it ended, unable to bind)."""
    banner = f"Server listening on {address} port {port}."
    deadline = time.monotonic() + 10
    while process_alive(server.pid):
        if banner in server.log():
            return True
        if time.monotonic() >= deadline:
            raise RuntimeError(f"sshd did not listen within 10 s; its log:\n{server.log()}")
        time.sleep(0.005)
    if "Address already in use" in server.log():
        return False
    raise RuntimeError(f"sshd ended; its log:\n{server.log()}")


def _stop(server: SshServer) -> None:
    """End the server, and what it still runs for clients: the supervisor does both.

    (Anything left below it was left by a test, and the leak check has said so.)
    """
    session_processes.pop(server.pid, None)
    os.close(server.control)
    if not dead_within([server.pid, server.supervisor], 10):
        for pid in (server.pid, server.supervisor):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise RuntimeError(f"the test sshd {server.pid} did not end within 10 s")


@contextlib.contextmanager
def running_sshd(
    directory: Path,
    *,
    address: str = "127.0.0.1",
    port: int | None = None,
    alias: str = "testhost",
    prefix: Sequence[str] = (),
    options: Sequence[str] = (),
) -> Iterator[SshServer]:
    """Run an sshd for the tests on ``address`` (and ``port``, or a free one).

    Its keys, configs and log go in ``directory``, which must exist. ``prefix`` runs it
    in another network namespace (``["ip", "netns", "exec", name]``); ``options`` are
    more sshd_config lines (``"ClientAliveInterval 1"``). It is stopped, with whatever
    it still runs for clients, when the block ends.
    """
    openssh = require_openssh()
    user = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() == 0:
        _privilege_separation_directory()
    host_key = directory / "ssh_host_ed25519_key"
    identity = directory / "id_ed25519"
    authorized_keys = directory / "authorized_keys"
    known_hosts = directory / "known_hosts"
    host_public = _keygen(openssh, host_key, f"{alias} host key")
    authorized_keys.write_text(_keygen(openssh, identity, f"{user}@tests") + "\n")
    known_hosts.write_text(f"{alias} {host_public}\n")
    log_path = directory / "sshd.log"
    for _ in range(3):
        chosen = port or _free_port(address)
        config = directory / "sshd_config"
        _write_sshd_config(
            openssh,
            config,
            _sshd_config(
                address=address,
                port=chosen,
                host_key=host_key,
                authorized_keys=authorized_keys,
                user=user,
            )
            + list(options),
        )
        client_config = directory / "ssh_config"
        client_config.write_text(
            _client_config(
                alias=alias,
                address=address,
                port=chosen,
                user=user,
                identity=identity,
                known_hosts=known_hosts,
            )
        )
        target = SshTarget(
            destination=alias,
            config=client_config,
            address=address,
            port=chosen,
            user=user,
            identity=identity,
            known_hosts=known_hosts,
        )
        log_path.write_bytes(b"")
        supervisor, pid, control = _start_detached(
            [*prefix, openssh.sshd, "-D", "-E", str(log_path), "-f", str(config)], log_path
        )
        server = SshServer(
            target=target, pid=pid, supervisor=supervisor, control=control, log_path=log_path
        )
        session_processes[pid] = f"test sshd on {address} port {chosen}"
        try:
            listening = _wait_listening(server, address, chosen)
        except BaseException:
            _stop(server)
            raise
        if listening:
            break
        _stop(server)
        if port is not None:
            raise RuntimeError(f"sshd cannot listen on {address} port {port}: it is taken")
    else:
        raise RuntimeError(f"sshd found no free port on {address} in 3 tries")
    try:
        yield server
    finally:
        _stop(server)


# Network-namespace test hosts ----------------------------------------------------------


def _ip(*args: str) -> None:
    run = subprocess.run(["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")


def _tc(*args: str) -> None:
    run = subprocess.run(["tc", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {run.stderr.strip()}")


def require_netns() -> None:
    """Skip (fail under CI=true) where test hosts in network namespaces cannot be made."""
    if os.geteuid() != 0:
        _unavailable("test hosts in network namespaces need root")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        _unavailable("test hosts need ip and tc: apt-get install iproute2 (.ci/run does it)")


@attrs.define(eq=False)
class NetnsHost:
    """A test host: a network namespace with its own sshd on its own address.

    Its one link to this namespace is a veth pair, ``veth`` here and ``eth0`` there,
    with ``local_address`` and ``address`` in a /30 of their own; the namespace has no
    other route. ``exec_prefix`` runs a command in the namespace without ssh.
    """

    netns: str
    veth: str
    address: str
    local_address: str
    server: SshServer
    cut_by: Literal["drop", "down"] | None = None

    @property
    def target(self) -> SshTarget:
        return self.server.target

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]

    def cut(self, how: Literal["drop", "down"] = "drop") -> None:
        """Cut the link.

        ``"drop"`` drops every packet both ways (a blackhole qdisc on both ends): the
        link stays up and no one hears a thing, like a cable cut somewhere between two
        routers. ``"down"`` takes this end of the veth down: the host loses its carrier
        and this side its route to the host, so that its sends fail at once ("No route
        to host"), though no FIN or RST arrives either.
        """
        if self.cut_by is not None:
            raise RuntimeError(f"the link to {self.netns} is already cut ({self.cut_by})")
        if how == "drop":
            _tc("qdisc", "replace", "dev", self.veth, "root", "blackhole")
            _tc("-n", self.netns, "qdisc", "replace", "dev", "eth0", "root", "blackhole")
        elif how == "down":
            _ip("link", "set", self.veth, "down")
        else:
            raise ValueError(f"how must be 'drop' or 'down', not {how!r}")
        self.cut_by = how

    def restore(self) -> None:
        """Undo ``cut``: connections that were not given up go on where they were."""
        if self.cut_by == "drop":
            _tc("qdisc", "del", "dev", self.veth, "root")
            _tc("-n", self.netns, "qdisc", "del", "dev", "eth0", "root")
        elif self.cut_by == "down":
            _ip("link", "set", self.veth, "up")
        self.cut_by = None


def _guard_test_range() -> None:
    """Make sure no packet for the test range ever leaves through the default route.

    A host's own /30 route, the longer prefix, wins while its link is up; once it is
    down, or gone while a connection to it lingers, this route answers "unreachable"
    here instead of sending the packets out to the gateway. It stays after the session
    (sessions may run side by side, so none can tell it is the last), and it is harmless:
    the range is not in use on any network.
    """
    run = subprocess.run(
        ["ip", "route", "add", "unreachable", str(_TEST_RANGE)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0 and "File exists" not in run.stderr:
        raise RuntimeError(f"ip route add unreachable {_TEST_RANGE}: {run.stderr.strip()}")


def _remove_stale_namespaces() -> None:
    """Namespaces that a killed test session left: their veths go with them."""
    listing = subprocess.run(
        ["ip", "-j", "netns", "list"], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    for entry in json.loads(listing.stdout or "[]"):
        match = re.fullmatch(r"tfork(\d+)h\d+", entry["name"])
        if match and not process_alive(int(match[1])):
            _ip("netns", "del", entry["name"])


def _free_network() -> ipaddress.IPv4Network:
    """A /30 of the test range that no address or route here overlaps."""
    routes = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    )
    used = [
        ipaddress.IPv4Network(route["dst"], strict=False)
        for route in json.loads(routes.stdout or "[]")
        if route.get("dst", "default") not in ("default", str(_TEST_RANGE))
    ]
    blocks = _TEST_RANGE.num_addresses // 4
    for _ in range(100):
        start = _TEST_RANGE.network_address + 4 * random.randrange(blocks)
        network = ipaddress.IPv4Network(f"{start}/30")
        if not any(network.overlaps(other) for other in used):
            return network
    raise RuntimeError(f"no free /30 in {_TEST_RANGE}")


@contextlib.contextmanager
def _netns_host(directory: Path, options: Sequence[str]) -> Iterator[NetnsHost]:
    number = next(_host_numbers)
    netns = f"tfork{os.getpid()}h{number}"
    veth = f"tf{os.getpid()}h{number}"
    network = _free_network()
    local_address, address = (str(a) for a in network.hosts())
    prefix = f"/{network.prefixlen}"
    with contextlib.ExitStack() as cleanup:
        _ip("netns", "add", netns)
        cleanup.callback(_ip, "netns", "del", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        # Deleting one end deletes the pair; the namespace's deletion would too, but
        # only once nothing runs in it.
        cleanup.callback(_ip, "link", "del", veth)
        _ip("addr", "add", local_address + prefix, "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", netns, "addr", "add", address + prefix, "dev", "eth0")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "link", "set", "eth0", "up")
        host_directory = directory / netns
        host_directory.mkdir()
        server = cleanup.enter_context(
            running_sshd(
                host_directory,
                address=address,
                port=22,
                alias=f"h{number}",
                prefix=["ip", "netns", "exec", netns],
                options=options,
            )
        )
        host = NetnsHost(
            netns=netns, veth=veth, address=address, local_address=local_address, server=server
        )
        # A cut link left by a failing test must not stop the sshd's own cleanup.
        cleanup.callback(host.restore)
        yield host


@contextlib.contextmanager
def open_netns_hosts(count: int, *, options: Sequence[str] = ()) -> Iterator[list[NetnsHost]]:
    """``count`` test hosts in network namespaces, each with its own sshd; see NetnsHost.

    ``options`` are more sshd_config lines for every host's sshd (see running_sshd).

    Everything is removed when the block ends, however it ends; namespaces that a
    killed session left behind are removed first.
    """
    require_openssh()
    require_netns()
    _guard_test_range()
    _remove_stale_namespaces()
    with tempfile.TemporaryDirectory(prefix="tfork-netns-") as directory:
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(_netns_host(Path(directory), options)) for _ in range(count)]


# Fixtures ------------------------------------------------------------------------------
# tests/conftest.py loads them with ``pytest_plugins = [..., "tests.sshd"]``; a test module
# may instead import them (``from tests.sshd import ssh_target_fixture``: each function
# is named apart from its fixture, so that the import does not shadow the test's
# argument).


@pytest.fixture(scope="session", name="sshd_server")
def sshd_server_fixture() -> Iterator[SshServer]:
    """An sshd on 127.0.0.1 and a free port, with its own keys and configs."""
    require_openssh()
    with tempfile.TemporaryDirectory(prefix="tfork-sshd-") as directory:
        with running_sshd(Path(directory)) as server:
            yield server


@pytest.fixture(scope="session", name="ssh_target")
def ssh_target_fixture(sshd_server: SshServer) -> SshTarget:
    """What a client needs for ``sshd_server``: ``[*ssh_target.command, "true"]``."""
    return sshd_server.target


@pytest.fixture(name="netns_hosts")
def netns_hosts_fixture() -> Iterator[list[NetnsHost]]:
    """Two test hosts in network namespaces, made for the test and removed after it."""
    with open_netns_hosts(2) as hosts:
        yield hosts
