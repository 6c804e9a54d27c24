"""Opening a template: ``open_template``, and the templates it forks from.

The only owner of the early template (:func:`start_early`) and of the process-wide
default template. :func:`open_template` forks the early template when it runs, else
the default template (started on first use, kept for the life of the process), and
starts an interpreter of its own only when asked for one that the default template
is not (another ``python``, ``env`` or ``cwd``, or ``fresh=True``).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

import anyio
import attrs

from ._arguments import module_names
from ._channel import Channel
from ._errors import BrokenTemplateError
from ._handle import TemplateHandle, _serve_forks, _setup_now, start_handle
from ._process import launch
from ._template import Template
from ._transport import Transport


@attrs.define(eq=False)
class _Early:
    """The early template of this process, if :func:`start_early` ran."""

    handle: TemplateHandle | None = None
    lock: threading.Lock = attrs.field(factory=threading.Lock)


_early = _Early()


def early_handle() -> TemplateHandle | None:
    """The early template's handle, while it runs."""
    early = _early.handle
    return early if early is not None and not early.closed else None


@asynccontextmanager
async def open_template(
    preload: Iterable[str] = (),
    *,
    python: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    fresh: bool = False,
) -> AsyncIterator[Template]:
    """Open a template process, and end it and everything it started on exit.

    Use as ``async with open_template(...) as template:``.

    A template is a Python process running a small synchronous command server that
    imports only the standard library (:mod:`trio_fork.worker`): no event loop ever
    runs in it, so it is safe to fork. Its ``sys.path`` is this process's, so
    whatever is importable here is importable there. Its stdin is ``/dev/null``;
    stdout and stderr are this process's; it inherits no other descriptor. It
    ignores SIGINT.

    It is forked from the process-wide **default template**, AnyEvent::Fork's
    ``new``: a template interpreter started the first time :func:`open_template`
    needs it (the one slow call, tens of milliseconds), then kept until the
    interpreter exits and shared by every event loop and thread of the process, so
    that every later :func:`open_template` costs a fork. The fork is what a fresh
    interpreter would be: this process's current ``sys.path``, working directory and
    environment are applied to it. Settings an interpreter reads only when it starts
    (``PYTHONHASHSEED``, ``-X`` options) are those of the moment the default
    template started. After :func:`start_early`, the early template takes its
    place. The template you get is then a child of the default (or early) template,
    not of this process (see :attr:`Template.pid`).

    A fresh interpreter of its own is started instead when ``python``, ``env`` or
    ``cwd`` differ from what the default template has (another interpreter, an
    environment or a directory other than this process's), with ``fresh=True``, or
    in a process whose environment sets ``TRIO_FORK_DEFAULT_TEMPLATE=0``: for
    programs that want nothing shared between their templates.

    Leaving the block, however it is left, closes the template's socket and sends
    it SIGTERM; the template kills and reaps every process below it, then exits (or
    is killed if it has not exited after a few seconds). The block waits for that,
    shielded from cancellation. The default template carries on.

    Args:
        preload: Modules to import in the template before it is handed out.
        python: The interpreter to run (default: :data:`sys.executable`). It must
            run this process's Python version (major.minor), since the template
            imports from this process's ``sys.path``.
        env: The template's environment, as in :mod:`subprocess` (default: this
            process's).
        cwd: The template's working directory, as in :mod:`subprocess`.
        fresh: Start a new interpreter, even if the default or early template
            could be forked.

    Yields:
        Template: The ready template, with ``preload`` imported.

    Raises:
        TypeError: ``preload`` is a string rather than a sequence of module names.
        OSError: The interpreter could not be started (for instance
            :exc:`FileNotFoundError` for a missing interpreter or ``cwd``).
        BrokenTemplateError: The template exited before it was ready, or runs
            another Python version.
        RemoteError: A preloaded module failed to import.
    """
    modules = module_names(preload, "preload")
    early = None if fresh else early_handle()
    if early is not None and python is None:
        async with early._open_aligned(modules, env, cwd) as template:
            yield template
        return
    if not fresh and _default_fits(python, env, cwd):
        async with _forked_from_default(modules) as template:
            yield template
        return
    executable = os.fspath(python) if python is not None else sys.executable
    if not executable:
        raise RuntimeError("sys.executable is unknown here: pass python= to open_template")
    async with _started(executable, env, cwd) as template:
        if modules:
            await template.require(*modules)
        yield template


@asynccontextmanager
async def _started(
    executable: str,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
    *,
    how: str = "import",
    isolated: bool = False,
) -> AsyncIterator[Template]:
    """A template interpreter of our own, ready (see ``launch`` for ``how``)."""
    process, pidfd, ours = launch(executable, env, cwd, how=how, isolated=isolated)
    transport = Transport(ours) if isinstance(ours, socket.socket) else Transport(pipes=ours)
    channel = Channel(transport, f"template {process.pid}")
    template = Template._create(channel, process.pid, pidfd, None, process)
    ready = channel.expect_ready()
    async with template._serving():
        await template._handshake(ready, executable)
        yield template


def start_early() -> None:
    """Keep a pristine template, and make :func:`open_template` fork it from now on.

    Python's counterpart of AnyEvent::Fork::Early. It starts one small template
    interpreter (only the standard library imported) and keeps it; afterwards every
    :func:`open_template` without ``python=`` or ``fresh=True`` asks it to fork, in
    place of the default template, so that even the first :func:`open_template` of
    the program, and one with ``env`` or ``cwd`` of its own, costs a fork. The
    template you get is the one you would have got: :func:`open_template` applies
    this process's current ``sys.path``, working directory and environment (or its
    ``env`` and ``cwd`` arguments) to it. Settings an interpreter reads only when it
    starts, such as ``PYTHONHASHSEED`` or ``-X`` options, are those of the moment
    :func:`start_early` ran.

    Call it first thing in the program, before any event loop runs: it blocks while
    that one interpreter starts (tens of milliseconds). Calling it again while
    the early template runs does nothing.

    A template opened after :func:`start_early` is a child of the early template,
    not of this process (see :attr:`Template.pid`); leaving its block still ends it
    and waits until it has been reaped. The early template ends with
    :func:`stop_early`, at interpreter exit, or when this process dies. If it is
    killed from outside, :func:`open_template` raises :exc:`BrokenTemplateError`
    until :func:`stop_early` is called, or :func:`start_early` again, which replaces
    it.
    """
    with _early.lock:
        early = _early.handle
        if early is not None and not (early.closed or early._broken or early._exited()):
            return
        if early is not None:
            early.close()  # it died: reap it, and start another
        _early.handle = start_handle([], None, None, None, "early template")


def stop_early() -> None:
    """End the early template; :func:`open_template` forks the default template again.

    Templates opened from it and still in use end too. Does nothing if
    :func:`start_early` has not run.
    """
    with _early.lock:
        early, _early.handle = _early.handle, None
    if early is not None:
        early.close()


DEFAULT_TEMPLATE_VARIABLE = "TRIO_FORK_DEFAULT_TEMPLATE"
"""Set to ``0`` (or ``false``, ``no``, ``off``), no default template: every
:func:`open_template` starts an interpreter, as with ``fresh=True``."""


@attrs.define(eq=False)
class _Default:
    """The process-wide default template, once started."""

    handle: TemplateHandle | None = None
    lock: threading.Lock = attrs.field(factory=threading.Lock)


_default = _Default()


def _usable(handle: TemplateHandle | None) -> bool:
    return handle is not None and not (handle.closed or handle._broken or handle._exited())


def _default_fits(
    python: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
) -> bool:
    """Whether open_template(python=, env=, cwd=) can be a fork of the default template."""
    setting = os.environ.get(DEFAULT_TEMPLATE_VARIABLE, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if python is not None and os.fspath(python) != sys.executable:
        return False
    if env is not None and dict(env) != dict(os.environ):
        return False
    return cwd is None or os.path.abspath(cwd) == os.getcwd()


def default_handle() -> TemplateHandle:
    """The handle that :func:`open_template` forks, started if need be (blocking).

    The early template's while it runs, else the process-wide default template's,
    started now (an interpreter start: tens of milliseconds, so call it from a
    worker thread when an event loop runs) if it has not started yet, or was closed,
    or has died. For code of trio_fork's own that keeps templates across event
    loops, as :func:`open_template` does.
    """
    early = early_handle()
    if early is not None:
        return early
    handle = _default.handle
    if _usable(handle):
        assert handle is not None
        return handle
    with _default.lock:
        handle = _default.handle
        if not _usable(handle):
            if handle is not None:
                handle.close()  # it died: reap it, and start another
            handle = _default.handle = start_handle([], None, None, None, "default template")
        assert handle is not None
        return handle


async def _default_handle_async() -> TemplateHandle:
    """:func:`default_handle` (without Early), without blocking the event loop for long."""
    handle = _default.handle
    if _usable(handle):
        assert handle is not None
        return handle
    # The interpreter start is waited for here; only the few exchanges after it (a
    # millisecond) block, in _serve_forks. Two event loops that start one at the
    # same moment both do; the later one to finish closes its own.
    executable = sys.executable
    if not executable:
        raise RuntimeError("sys.executable is unknown here: pass python= to open_template")
    setup = _setup_now(None, None)
    process, pidfd, channel = launch(executable, None, None)
    assert isinstance(channel, socket.socket)
    try:
        await anyio.wait_readable(channel)  # its READY, or end of file if it died
    except BaseException:
        channel.close()
        os.close(pidfd)
        process.kill()
        process.wait()
        raise
    started = _serve_forks(
        "default template", process.pid, pidfd, channel, process, [], executable, setup
    )
    with _default.lock:
        current = _default.handle
        extra: TemplateHandle | None = started
        chosen = current if current is not None and _usable(current) else started
        if chosen is started:
            extra, _default.handle = current, started
    if extra is not None:
        extra.close()
    return chosen


@asynccontextmanager
async def _forked_from_default(modules: list[str]) -> AsyncIterator[Template]:
    """A fork of the default template, as open_template(modules) would start it now."""
    for attempt in (1, 2):
        handle = await _default_handle_async()
        entered = False
        try:
            async with handle._open_aligned(modules, None, None) as template:
                entered = True
                yield template
            return
        except BrokenTemplateError:
            # It died since it was last used: once, start another and try again.
            if entered or attempt == 2:
                raise


def _stop_default() -> None:
    """End the default template now (the tests' leak check wants nothing left)."""
    with _default.lock:
        handle, _default.handle = _default.handle, None
    if handle is not None:
        handle.close()


def _forget_in_child() -> None:
    # A forked copy of this process owns no early or default template (see
    # TemplateHandle._forget): it starts a default template of its own when it needs one.
    _early.handle = None
    _early.lock = threading.Lock()
    _default.handle = None
    _default.lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
