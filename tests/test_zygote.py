"""``trio_fork run`` and ``serve``: programs run by a preloaded server, as python runs them.

Everything here runs real processes: a server per AnyIO backend (started apart from
the test process, as ``run`` starts one), clients as the user would run them, real
signals, a real pseudo-terminal. Where it can, a test runs the same program with
``python`` and with ``trio_fork run`` and compares what they did.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.helpers import dead_within, libffi, process_alive
from trio_fork._zygote_fresh import _MARGIN_NS

DETACHED = Path(__file__).resolve().parent / "scripts" / "detached.py"
PRELOAD = "zyfresh"
TIMEOUT = 60  # a safety net for a hang; nothing here should take more than a second

PROBE = """\
import json, os, signal, sys
main = sys.modules["__main__"]
umask = os.umask(0)
print(json.dumps({
    "argv": sys.argv,
    "file": getattr(main, "__file__", None),
    "path0": sys.path[0],
    "cwd": os.getcwd(),
    "umask": umask,
    "env": os.environ.get("ZY_VALUE"),
    "main": sorted(vars(main)),
    "spec": main.__spec__ and [main.__spec__.name, main.__spec__.origin],
    "sighup_ignored": signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
    "sigint": repr(signal.getsignal(signal.SIGINT)),
    "isatty": [os.isatty(fd) for fd in (0, 1, 2)],
    "stdio": [(s.name, s.mode, s.line_buffering, s.encoding, s.errors)
              for s in (sys.stdin, sys.stdout, sys.stderr)],
    "stdin_seekable": sys.stdin.seekable(),
}))
"""
SIGNALS = """\
import os, signal, sys, time
def report(signum, frame):
    os.write(1, f"{signal.Signals(signum).name}\\n".encode())  # print() is not reentrant
    if signum == signal.SIGTERM:
        sys.exit(42)
for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGQUIT,
            signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, report)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(1)
"""
SLEEPER = """\
import os, subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("ready", os.getpid(), helper.pid, flush=True)
time.sleep(60)
"""
# The programs that tests interrupt wait in short waits: CPython runs a signal's handler
# between two bytecodes, and a Ctrl-C that came after the last check before a long
# blocking call (a read, a 60 s sleep) would wait for its end, as under python itself.
READER = """\
import os, select, sys
print("ready", os.getpid(), flush=True)
while not select.select([sys.stdin], [], [], 0.05)[0]:
    pass
print("got", sys.stdin.readline().strip(), flush=True)
"""
TERMINAL = """\
import sys, time
print("tty", sys.stdin.isatty(), sys.stdout.isatty(), sys.stdout.line_buffering)
name = input("name? ")
print("hello", name)
for _ in range(1200):
    time.sleep(0.05)
"""
CONCURRENT = """\
import json, os, sys
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:  # the one that listdir opened, closed since
        pass
print(sys.argv[1], os.environ["ZY_VALUE"], sys.stdin.read(), json.dumps(fds), flush=True)
sys.exit(int(sys.argv[1]))
"""
ENDING = """\
import atexit, threading, time
from concurrent.futures import ThreadPoolExecutor
atexit.register(print, "atexit ran")
log = open("unclosed.txt", "w")
log.write("flushed at exit")
def late():
    time.sleep(0.1)
    print("thread joined", flush=True)
threading.Thread(target=late).start()
ThreadPoolExecutor().submit(print, "pool worked")
"""


@attrs.frozen
class Zygote:
    """A server for one backend, and how to run programs through it."""

    backend: str
    env: dict[str, str]
    scripts: Path
    modules: Path
    log: Path

    def command(self, *args: str, preload: bool = True) -> list[str]:
        options = [f"--preload={PRELOAD}"] if preload else []
        return [sys.executable, "-m", "trio_fork", "run", *options, *args]

    def run(self, *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
        options.setdefault("cwd", self.scripts)
        return subprocess.run(
            self.command(*args),
            env=options.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            **options,
        )

    @contextmanager
    def popen(self, *args: str, **options: Any) -> Iterator[subprocess.Popen[str]]:
        """A client running in the block; killed if the block fails."""
        options.setdefault("cwd", self.scripts)
        options.setdefault("stdout", subprocess.PIPE)
        with subprocess.Popen(self.command(*args), env=self.env, text=True, **options) as process:
            try:
                yield process
            finally:
                if process.poll() is None:
                    process.kill()

    def python(self, *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
        options.setdefault("cwd", self.scripts)
        return subprocess.run(
            [sys.executable, *args],
            env=options.pop("env", self.env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            **options,
        )

    def control(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trio_fork", "serve", f"--preload={PRELOAD}", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )


@contextmanager
def runtime_dir() -> Iterator[Path]:
    """A directory for XDG_RUNTIME_DIR, removed after."""
    # Short, under /tmp: a socket's path may hold 107 bytes at most.
    path = Path(tempfile.mkdtemp(prefix="tfz-", dir="/tmp"))
    try:
        path.chmod(0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def socket_file(env: dict[str, str], preload: str = PRELOAD) -> str:
    """Where the server for ``env`` and ``preload`` listens, as a client computes it."""
    code = f"from trio_fork._zygote_client import socket_path; print(socket_path([{preload!r}]))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def wait_listening(path: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


@pytest.fixture(scope="module", autouse=True)
def _signals_as_under_a_terminal() -> Iterator[None]:
    """Ctrl-C and Ctrl-\\ not ignored here, as in a shell's foreground job.

    A non-interactive shell starts a background job (``make test &``) with SIGINT and
    SIGQUIT ignored, and the clients would inherit that: each passes it on to its
    program, as python would ignore them too, and the tests that send them would wait
    in vain.
    """
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGQUIT)}
    if saved[signal.SIGINT] == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if saved[signal.SIGQUIT] == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module", params=["trio", "asyncio"])
def zygote(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Zygote]:
    """A server on ``backend`` with ``zyfresh`` preloaded, run apart from this process."""
    backend = str(request.param)
    base = tmp_path_factory.mktemp(f"zygote-{backend}")
    scripts, modules = base / "scripts", base / "modules"
    scripts.mkdir()
    modules.mkdir()
    (modules / f"{PRELOAD}.py").write_text("VALUE = 1\n")
    for name, text in [
        ("probe.py", PROBE),
        ("signals.py", SIGNALS),
        ("sleeper.py", SLEEPER),
        ("reader.py", READER),
        ("terminal.py", TERMINAL),
        ("many.py", CONCURRENT),
        ("ending.py", ENDING),
    ]:
        (scripts / name).write_text(text)
    with runtime_dir() as directory:
        env = {**os.environ, "XDG_RUNTIME_DIR": str(directory), "PYTHONPATH": str(modules)}
        env.pop("PYTHONUNBUFFERED", None)  # so that buffering shows
        yield from _serving(Zygote(backend, env, scripts, modules, base / "server.log"))


def _serving(zygote: Zygote) -> Iterator[Zygote]:
    """Run ``serve`` for ``zygote`` under tests/scripts/detached.py, while the module runs."""
    control_read, control_write = os.pipe()
    command = [sys.executable, "-m", "trio_fork", "serve", "--backend", zygote.backend]
    with (
        open(zygote.log, "ab") as log_file,
        subprocess.Popen(
            [sys.executable, str(DETACHED), *command, f"--preload={PRELOAD}"],
            stdin=control_read,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=zygote.env,
        ) as launcher,
    ):
        assert launcher.stdout is not None
        launcher.stdout.readline()
    os.close(control_read)
    try:
        wait_listening(socket_file(zygote.env))
        yield zygote
    finally:
        # --all: any server a test made run (with another preload list, say) too.
        zygote.control("--stop", "--all")
        os.close(control_write)


def read_line(stream: Any, seconds: float = 30) -> str:
    """A line from a pipe, waiting no longer than ``seconds`` (a safety net).

    Read a byte at a time, so that nothing waits in a buffer that select cannot see.
    """
    line = b""
    deadline = time.monotonic() + seconds
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no line: {line!r}"
        assert select.select([stream], [], [], left)[0], f"no line: {line!r}"
        byte = os.read(stream.fileno(), 1)
        assert byte, f"end of file after {line!r}"
        line += byte
    return line.decode()


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as file:
        stat = file.read()
    return stat[stat.rindex(")") + 2]


def wait_for_state(pids: list[int], wanted: bool, state: str = "T") -> None:
    deadline = time.monotonic() + 30
    while any((state_of(pid) == state) != wanted for pid in pids):
        assert time.monotonic() < deadline, f"{pids} did not get to state {state}={wanted}"
        time.sleep(0.005)


# What a program sees --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("probe.py", "a", "b c"),
        ("-m", "probe", "x"),
        ("-c", PROBE, "y"),
    ],
    ids=["script", "module", "code"],
)
def test_a_program_sees_what_python_would_show_it(zygote: Zygote, args: tuple[str, ...]) -> None:
    env = {**zygote.env, "ZY_VALUE": "from the client"}
    with open(zygote.scripts / "probe.py") as stdin:
        ours = zygote.run(*args, env=env, umask=0o027, stdin=stdin)
    with open(zygote.scripts / "probe.py") as stdin:
        python = zygote.python(*args, env=env, umask=0o027, stdin=stdin)
    assert ours.returncode == python.returncode == 0, ours.stderr
    assert json.loads(ours.stdout) == json.loads(python.stdout)
    assert ours.stderr == python.stderr == ""


def test_the_preloaded_module_is_there_before_the_program_imports_it(zygote: Zygote) -> None:
    result = zygote.run("-c", f"import sys; print(sys.modules['{PRELOAD}'].VALUE)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().isdigit()


@pytest.mark.parametrize(
    "code",
    [
        "import sys; sys.exit(3)",
        "import sys; sys.exit('a message')",
        "raise ValueError('boom')",
        "def f(:\n  pass",
        "import os; os._exit(7)",
        "import os, signal; os.kill(os.getpid(), signal.SIGUSR1)",
        "import os, resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); os.abort()",
        "raise KeyboardInterrupt",
        "import sys; sys.stdout.write('unflushed'); sys.exit(4)",
    ],
    ids=["exit3", "message", "exception", "syntax", "os_exit", "signal", "abort", "ctrl_c", "out"],
)
def test_exit_status_and_messages_are_pythons(zygote: Zygote, code: str) -> None:
    (zygote.scripts / "ending_case.py").write_text(code + "\n")
    ours = zygote.run("ending_case.py")
    python = zygote.python("ending_case.py")
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        python.returncode,
        python.stdout,
        python.stderr,
    )


def test_a_missing_script_fails_as_with_python(zygote: Zygote) -> None:
    ours = zygote.run("no_such_script.py")
    python = zygote.python("no_such_script.py")
    assert ours.returncode == python.returncode == 2
    assert ours.stderr == python.stderr
    assert "can't open file" in ours.stderr


def test_a_missing_module_fails_as_with_python(zygote: Zygote) -> None:
    ours, python = zygote.run("-m", "no_such_module_zz"), zygote.python("-m", "no_such_module_zz")
    assert (ours.returncode, ours.stderr) == (python.returncode, python.stderr) != (0, "")


@pytest.mark.parametrize("fd", [0, 1, 2])
def test_a_closed_standard_stream_is_closed_for_the_program(zygote: Zygote, fd: int) -> None:
    code = "import sys; print([s is None for s in (sys.stdin, sys.stdout, sys.stderr)], "
    code += "file=sys.stderr if sys.stdout is None else sys.stdout)"

    def with_closed(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", f'exec "$@" {fd}<&-', "sh", *command],
            env=zygote.env,
            cwd=zygote.scripts,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    ours = with_closed(zygote.command("-c", code))
    python = with_closed([sys.executable, "-c", code])
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        python.returncode,
        python.stdout,
        python.stderr,
    )
    assert "True" in ours.stdout + ours.stderr


def test_a_directory_with_main_runs_as_with_python(zygote: Zygote) -> None:
    package = zygote.scripts / "app"
    package.mkdir(exist_ok=True)
    (package / "__main__.py").write_text("import sys; print(sys.argv, __name__, sys.path[0])\n")
    ours, python = zygote.run("app", "z"), zygote.python("app", "z")
    assert ours.returncode == python.returncode == 0, ours.stderr
    assert ours.stdout == python.stdout


def test_threads_atexit_and_unclosed_files_end_as_with_python(zygote: Zygote) -> None:
    ours = zygote.run("ending.py")
    assert ours.returncode == 0, ours.stderr
    written = (zygote.scripts / "unclosed.txt").read_text()
    python = zygote.python("ending.py")
    assert ours.stdout == python.stdout
    assert written == (zygote.scripts / "unclosed.txt").read_text() == "flushed at exit"
    assert set(ours.stdout.split("\n")) >= {"atexit ran", "thread joined", "pool worked"}


def test_signals_ignored_by_the_client_are_ignored_by_the_program(zygote: Zygote) -> None:
    nohup = "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    nohup += "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    ours = zygote.python("-c", nohup, *zygote.command("probe.py")[1:])
    assert ours.returncode == 0, ours.stderr
    assert json.loads(ours.stdout)["sighup_ignored"] is True
    assert json.loads(zygote.run("probe.py").stdout)["sighup_ignored"] is False


# Streams --------------------------------------------------------------------------


def test_stdin_from_a_pipe(zygote: Zygote) -> None:
    result = zygote.run("-c", "import sys; print(len(sys.stdin.read()))", input="x" * 100_000)
    assert (result.returncode, result.stdout) == (0, "100000\n"), result.stderr


def test_stdin_from_a_file_is_that_file(zygote: Zygote) -> None:
    code = "import os, sys; print(sys.stdin.seekable(), os.fstat(0).st_ino, sys.stdin.read(5))"
    path = zygote.scripts / "probe.py"
    with open(path) as stdin:
        result = zygote.run("-c", code, stdin=stdin)
    assert result.stdout.split() == ["True", str(path.stat().st_ino), "impor"], result.stderr


def test_a_hundred_megabytes_on_stdout(zygote: Zygote) -> None:
    code = "import sys\nfor _ in range(100): sys.stdout.buffer.write(b'x' * 2**20)"
    with zygote.popen("-c", code) as process:
        assert process.stdout is not None
        total = 0
        while chunk := process.stdout.buffer.read1(2**20):
            total += len(chunk)
        assert process.wait(TIMEOUT) == 0
    assert total == 100 * 2**20


# Signals --------------------------------------------------------------------------


def test_signals_reach_the_program_as_if_sent_to_it(zygote: Zygote) -> None:
    with zygote.popen("signals.py") as process:
        assert process.stdout is not None
        assert read_line(process.stdout).startswith("ready")
        for sig in (
            signal.SIGHUP,
            signal.SIGUSR1,
            signal.SIGUSR2,
            signal.SIGWINCH,
            signal.SIGQUIT,
            signal.SIGINT,
        ):
            process.send_signal(sig)
            assert read_line(process.stdout) == f"{sig.name}\n"
        process.send_signal(signal.SIGTERM)
        assert read_line(process.stdout) == "SIGTERM\n"
        assert process.wait(TIMEOUT) == 42


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_that_ends_the_program_ends_the_client_alike(
    zygote: Zygote, sig: signal.Signals
) -> None:
    with zygote.popen("reader.py", stdin=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        program = int(read_line(process.stdout).split()[1])
        process.send_signal(sig)
        assert process.wait(TIMEOUT) == -sig
        assert dead_within([program], 30)
        if sig == signal.SIGINT:  # python's KeyboardInterrupt, and its death by SIGINT
            assert process.stderr.read().splitlines()[-1] == "KeyboardInterrupt"


# A client whose main thread is in a long C call (a sum in C: no bytecode, so no
# Python-level signal handler can run until it ends), as it may be, in effect, when a
# signal lands just before it blocks in recv.
BUSY_CLIENT = """\
import socket, sys
from trio_fork._zygote_client import StandIn
stand_in = StandIn(socket.socket(fileno=int(sys.argv[1])))
stand_in.pass_signals(stand_in.hold_signals())
print("busy", flush=True)
sum(range(10**12))
"""


def test_a_signal_reaches_the_server_while_the_client_runs_no_python() -> None:
    ours, theirs = socket.socketpair()
    with (
        ours,
        subprocess.Popen(
            [sys.executable, "-c", BUSY_CLIENT, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdout=subprocess.PIPE,
        ) as process,
    ):
        theirs.close()
        try:
            assert read_line(process.stdout) == "busy\n"
            process.send_signal(signal.SIGUSR1)
            assert select.select([ours], [], [], TIMEOUT)[0], "the signal never came"
            assert ours.recv(8) == bytes([signal.SIGUSR1])
            assert process.poll() is None  # still in its sum: it came from no Python code
        finally:
            process.kill()


def test_stop_and_continue_reach_the_program(zygote: Zygote) -> None:
    # A group of its own, as a shell's job: the stop signals work in it.
    with zygote.popen("reader.py", stdin=subprocess.PIPE, process_group=0) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        program = int(read_line(process.stdout).split()[1])
        process.send_signal(signal.SIGTSTP)
        wait_for_state([process.pid, program], True)
        process.send_signal(signal.SIGCONT)
        wait_for_state([process.pid, program], False)
        process.stdin.write("on\n")
        process.stdin.flush()
        assert read_line(process.stdout) == "got on\n"
        assert process.wait(TIMEOUT) == 0


def test_a_killed_client_takes_its_program_along(zygote: Zygote) -> None:
    with zygote.popen("sleeper.py") as process:
        assert process.stdout is not None
        _, program, helper = read_line(process.stdout).split()
        process.kill()
    assert dead_within([int(program), int(helper)], 30)


def test_what_a_program_leaves_running_lives_on_as_after_python(zygote: Zygote) -> None:
    code = (
        "import subprocess, sys\n"
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(helper.pid)"
    )
    result = zygote.run("-c", code)
    assert result.returncode == 0, result.stderr
    helper = int(result.stdout)
    try:
        # Once the server has seen the run through, the helper still runs.
        deadline = time.monotonic() + 30
        while "0 run(s) in progress" not in zygote.control("--status").stdout:
            assert time.monotonic() < deadline
        assert process_alive(helper)
    finally:
        os.kill(helper, signal.SIGKILL)
    assert dead_within([helper], 30)


# A terminal -----------------------------------------------------------------------

# With start_new_session: the client leads a session with the terminal as its controlling
# terminal, in the foreground, as a shell runs a job.
ON_A_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def converse_on_a_terminal(command: list[str], env: dict[str, str], cwd: Path) -> tuple[str, int]:
    """Answer the prompt, then press Ctrl-C: what the terminal showed, and the status."""
    leader, follower = os.openpty()
    shown = b""

    def wait_for(text: bytes) -> None:
        nonlocal shown
        deadline = time.monotonic() + 30
        while text not in shown:
            assert time.monotonic() < deadline, f"{text!r} never came: {shown!r}"
            if select.select([leader], [], [], 1)[0]:
                try:
                    shown += os.read(leader, 4096)
                except OSError:  # EIO: nothing has the terminal open any more
                    raise AssertionError(f"{text!r} never came: {shown!r}") from None

    try:
        with subprocess.Popen(
            [sys.executable, "-c", ON_A_TERMINAL, *command[1:]],
            stdin=follower,
            stdout=follower,
            stderr=follower,
            env=env,
            cwd=cwd,
            start_new_session=True,
        ) as process:
            os.close(follower)
            follower = -1
            try:
                wait_for(b"name? ")
                os.write(leader, b"bob\n")
                # The whole line, as the terminal shows it: a Ctrl-C flushes what the
                # program wrote and we have not read yet (the "\r\n", if the line came
                # in two pieces), as a terminal discards output on an interrupt.
                wait_for(b"hello bob\r\n")
                os.write(leader, b"\x03")
                wait_for(b"KeyboardInterrupt")
                status = process.wait(TIMEOUT)
            finally:
                if process.poll() is None:
                    process.kill()
        # Where the traceback starts depends on when Ctrl-C came: its frames are left out.
        lines = shown.decode().replace("\r\n", "\n").splitlines()
        return "\n".join(line for line in lines if not line.startswith(" ")), status
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)


def test_a_terminal_stays_a_terminal_and_ctrl_c_interrupts(zygote: Zygote) -> None:
    ours, status = converse_on_a_terminal(zygote.command("terminal.py"), zygote.env, zygote.scripts)
    assert "tty True True True" in ours
    assert status == -signal.SIGINT  # a shell says 130
    python, python_status = converse_on_a_terminal(
        [sys.executable, "terminal.py"], zygote.env, zygote.scripts
    )
    assert (ours, status) == (python, python_status)


# Many at once ---------------------------------------------------------------------


def test_twenty_concurrent_runs_are_independent(zygote: Zygote) -> None:
    processes = [
        subprocess.Popen(
            zygote.command("many.py", str(index)),
            env={**zygote.env, "ZY_VALUE": f"value{index}"},
            cwd=zygote.scripts,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for index in range(20)
    ]
    outputs = [
        process.communicate(f"input{index}", TIMEOUT) for index, process in enumerate(processes)
    ]
    for index, (process, (out, _)) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == index
        number, value, data, fds = out.split(" ", 3)
        assert (number, value, data) == (str(index), f"value{index}", f"input{index}")
        # The standard streams and the connection to its own client: nothing of
        # another run's (and from Python 3.14 libffi's, as in every forked process).
        targets = {int(fd): target for fd, target in json.loads(fds).items()}
        others = set(targets) - libffi(targets) - {0, 1, 2}
        assert [targets[fd].startswith("socket:") for fd in others] == [True], targets


# Freshness ------------------------------------------------------------------------


def generation(zygote: Zygote) -> int:
    status = zygote.control("--status")
    assert status.returncode == 0, status.stdout + status.stderr
    return int(status.stdout.split("(generation ")[1].split(")")[0])


def test_a_changed_preloaded_module_is_picked_up(zygote: Zygote) -> None:
    read_value = ("-c", f"import sys; print(sys.modules['{PRELOAD}'].VALUE)")
    module = zygote.modules / f"{PRELOAD}.py"
    before = zygote.run(*read_value)
    assert before.returncode == 0, before.stderr
    first = generation(zygote)
    # Another size as well as another time: .pyc files are checked by both.
    module.write_text(f"VALUE = {int(before.stdout) + 1000}  # changed\n")
    # A file that changed within _MARGIN_NS of a template's start may have changed after
    # the template read it (file times lag the clock), so the server starts one more:
    # seen when the run below came within 10 ms. Past the margin, one new one is due.
    changed = module.stat().st_ctime_ns
    while time.time_ns() < changed + 2 * _MARGIN_NS:
        time.sleep(0.005)
    after = zygote.run(*read_value)
    assert int(after.stdout) == int(before.stdout) + 1000
    # The server's log says why it started each template.
    assert generation(zygote) == first + 1, zygote.log.read_text()
    assert zygote.run(*read_value).stdout == after.stdout
    assert generation(zygote) == first + 1, zygote.log.read_text()  # nothing changed since


def test_an_installed_package_is_picked_up(zygote: Zygote) -> None:
    first = generation(zygote)
    package = zygote.modules / f"installed_{time.monotonic_ns()}"
    package.mkdir()  # the directory on the import path changes, as pip changes it
    assert zygote.run("-c", "pass").returncode == 0
    assert generation(zygote) == first + 1


def test_a_preloaded_module_that_breaks_is_reported_until_it_is_fixed(zygote: Zygote) -> None:
    module = zygote.modules / f"{PRELOAD}.py"
    good = module.read_text()
    module.write_text("raise RuntimeError('broken on purpose')\n")
    try:
        broken = zygote.run("-c", "print('ran')")
        assert broken.returncode == 1
        assert broken.stdout == ""
        assert "a preloaded module failed to import" in broken.stderr
        assert "RuntimeError: broken on purpose" in broken.stderr
    finally:
        module.write_text(good)
    fixed = zygote.run("-c", "print('ran')")
    assert (fixed.returncode, fixed.stdout) == (0, "ran\n"), fixed.stderr


# Security -------------------------------------------------------------------------


# Forks a child that becomes uid 65534 and asks the server at argv[1] to run code that
# would create argv[2]; prints the child's exit status and what it heard back.
OTHER_UID_PEER = """\
import os, socket, sys
from trio_fork._zygote_client import request, send_request

path, marker = sys.argv[1:]
payload, fds = request("code", f"open({marker!r}, 'w')", ["-c"])
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            answer = b"answer:"
            try:
                send_request(sock, payload, fds)
                while chunk := sock.recv(4096):
                    answer += chunk
            except (BrokenPipeError, ConnectionResetError):  # closed on us
                answer += b"closed"
        os.write(write, answer)
    except BaseException as exc:
        os.write(write, repr(exc).encode())
    finally:
        os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
with open(read, "rb") as result:
    print(status, result.read().decode())
"""


def test_a_peer_of_another_uid_is_refused(zygote: Zygote) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root, to connect as another uid")
    path = socket_file(zygote.env)
    marker = zygote.scripts / f"ran-{zygote.backend}"
    directory = os.path.dirname(path)
    # Let uid 65534 reach the socket, so that the server itself must refuse it.
    for private in (directory, os.path.dirname(directory)):
        os.chmod(private, 0o711)
    os.chmod(path, 0o666)
    try:
        # The fork happens in a program of its own: pytest-timeout's thread makes this
        # process multi-threaded, and from Python 3.15 os.fork() here raises the
        # DeprecationWarning (an error under our filters) after the child exists.
        peer = zygote.python("-W", "error", "-c", OTHER_UID_PEER, path, str(marker))
    finally:
        for private in (directory, os.path.dirname(directory)):
            os.chmod(private, 0o700)
        os.chmod(path, 0o600)
    # Connected, then dropped unheard.
    assert peer.returncode == 0, peer.stderr
    assert peer.stdout in ("0 answer:\n", "0 answer:closed\n")
    assert not marker.exists()
    assert "refused a connection from pid" in zygote.log.read_text()
    assert "uid 65534" in zygote.log.read_text()


def test_the_socket_is_private_and_a_path(zygote: Zygote) -> None:
    path = socket_file(zygote.env)
    assert path.startswith(zygote.env["XDG_RUNTIME_DIR"] + "/trio_fork/")  # never abstract
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700


@pytest.mark.parametrize("problem", ["others may enter", "another owner", "a symbolic link"])
def test_the_client_refuses_a_directory_that_is_not_private(tmp_path: Path, problem: str) -> None:
    with runtime_dir() as base:
        refused_as(tmp_path, base, problem)


def refused_as(tmp_path: Path, base: Path, problem: str) -> None:
    directory = base / "trio_fork"
    if problem == "a symbolic link":
        directory.symlink_to(tmp_path)
    else:
        directory.mkdir(mode=0o755 if problem == "others may enter" else 0o700)
        if problem == "another owner":
            if os.getuid() != 0:
                pytest.skip("needs root, to give a directory away")
            os.chown(directory, 65534, 65534)
    result = subprocess.run(
        [sys.executable, "-m", "trio_fork", "run", "-c", "print('ran')"],
        env={**os.environ, "XDG_RUNTIME_DIR": str(base)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert str(directory) in result.stderr


# Starting, stopping and asking ------------------------------------------------------


@pytest.fixture
def private_env() -> Iterator[dict[str, str]]:
    """An environment of its own for servers started by ``run``; they are stopped after."""
    with runtime_dir() as directory:
        env = {**os.environ, "XDG_RUNTIME_DIR": str(directory)}
        try:
            yield env
        finally:
            subprocess.run(
                [sys.executable, "-m", "trio_fork", "serve", "--stop", "--all"],
                env=env,
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_fork", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_run_starts_a_server_says_so_once_and_serve_stops_it(private_env: dict[str, str]) -> None:
    first = cli(private_env, "run", "-v", "-c", "print(1)")
    assert (first.returncode, first.stdout) == (0, "1\n"), first.stderr
    assert "started a server (pid " in first.stderr
    server = int(first.stderr.split("(pid ")[1].split(")")[0])
    second = cli(private_env, "run", "-v", "-c", "print(2)")
    assert (second.returncode, second.stdout, second.stderr) == (0, "2\n", "")
    status = cli(private_env, "serve", "--status")
    assert status.returncode == 0, status.stderr
    assert f"server pid {server}," in status.stdout
    assert "0 run(s) in progress, 2 served" in status.stdout
    stop = cli(private_env, "serve", "--stop")
    assert (stop.returncode, stop.stdout) == (0, f"stopping server {server}\n")
    assert dead_within([server], 30)
    after = cli(private_env, "serve", "--status")
    assert after.returncode == 1
    assert after.stdout.startswith("no server runs for")
    assert not list((Path(private_env["XDG_RUNTIME_DIR"]) / "trio_fork").glob("*.sock"))


def test_concurrent_first_runs_start_one_server(private_env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "trio_fork", "run", "-v", "-c", "print('ran')"]
    processes = [
        subprocess.Popen(
            command, env=private_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    results = [process.communicate(timeout=TIMEOUT) for process in processes]
    assert [out for out, _ in results] == ["ran\n"] * 8
    assert sum("started a server" in err for _, err in results) == 1
    status = cli(private_env, "serve", "--status", "--all")
    assert status.stdout.count("server pid") == 1


def test_status_and_stop_of_every_server(private_env: dict[str, str]) -> None:
    for preload in ([], ["--preload=json"]):
        assert cli(private_env, "run", *preload, "-c", "pass").returncode == 0
    status = cli(private_env, "serve", "--status", "--all")
    assert status.stdout.count("server pid") == 2
    assert "preload: json" in status.stdout
    assert "preload: (nothing)" in status.stdout
    assert cli(private_env, "serve", "--stop", "--all").stdout.count("stopping server") == 2
    after = cli(private_env, "serve", "--status", "--all")
    assert (after.returncode, after.stdout) == (1, "no server runs\n")


def test_a_preload_that_fails_to_import_is_reported(private_env: dict[str, str]) -> None:
    result = cli(private_env, "run", "--preload=no_such_module_zz", "-c", "print('ran')")
    assert (result.returncode, result.stdout) == (1, "")
    assert "the server did not start" in result.stderr
    assert "ModuleNotFoundError: No module named 'no_such_module_zz'" in result.stderr
    # The server gave up: nothing listens, nothing is left running.
    status = cli(private_env, "serve", "--preload=no_such_module_zz", "--status")
    assert status.returncode == 1


def test_a_foreground_server_ends_on_sigterm_or_when_idle(private_env: dict[str, str]) -> None:
    idle = cli(private_env, "serve", "--idle-timeout", "0.1")
    assert idle.returncode == 0, idle.stderr
    assert "no run for 0.1 s" in idle.stderr
    with subprocess.Popen(
        [sys.executable, "-m", "trio_fork", "serve"],
        env=private_env,
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        wait_listening(socket_file(private_env, preload=""))
        server.send_signal(signal.SIGTERM)
        assert server.wait(TIMEOUT) == 0
        assert server.stderr is not None
        assert "stopping on SIGTERM" in server.stderr.read()
    assert cli(private_env, "serve", "--status").returncode == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "no program to run"),
        (["run", "--preload"], "--preload needs a module name"),
        (["run", "--preload", "not a module", "x.py"], "is not a module name"),
        (["run", "--frobnicate", "x.py"], "unknown option '--frobnicate'"),
        (["run", "-m"], "-m needs an argument"),
        (["run", "-"], "a program on stdin"),
        (["serve", "--all"], "--all goes with --status or --stop"),
        (["serve", "--idle-timeout", "0"], "must be more than 0"),
        (["serve", "--preload", "a b"], "is not a module name"),
    ],
)
def test_bad_command_lines_are_usage_errors(
    private_env: dict[str, str], args: list[str], message: str
) -> None:
    result = cli(private_env, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "usage:" in result.stderr


def test_run_help(private_env: dict[str, str]) -> None:
    result = cli(private_env, "run", "--help")
    assert result.returncode == 0
    assert "-m module" in result.stdout
    assert "--preload MODULES" in result.stdout


def test_the_console_script_runs_programs_too(zygote: Zygote) -> None:
    script = Path(sys.executable).parent / "trio-fork"
    assert script.exists(), "reinstall trio_fork: the trio-fork script is missing"
    result = subprocess.run(
        [str(script), "run", f"--preload={PRELOAD}", "-c", "import sys; print(sys.argv)", "x"],
        env=zygote.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "['-c', 'x']\n"), result.stderr
    # The same server as for python -m trio_fork, whatever the interpreter's name.
    assert zygote.control("--status", "--all").stdout.count("server pid") == 1
