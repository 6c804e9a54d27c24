"""Opening a template: ``open_template``, and the early template it forks from.

The only owner of the early template (:func:`start_early`): :func:`open_template`
forks it when it runs, and starts an interpreter otherwise.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

import attrs

from ._arguments import module_names
from ._channel import Channel
from ._handle import TemplateHandle, start_handle
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
) -> AsyncIterator[Template]:
    """Start a template process, and end it and everything it started on exit.

    Use as ``async with open_template(...) as template:``.

    The template is a fresh interpreter running a small synchronous command server
    that imports only the standard library (:mod:`trio_fork.worker`): no event loop
    ever runs in it, so it is safe to fork. Its ``sys.path`` is this process's, so
    whatever is importable here is importable there. Its stdin is ``/dev/null``;
    stdout and stderr are this process's; it inherits no other descriptor. It
    ignores SIGINT.

    Leaving the block, however it is left, closes the template's socket and sends
    it SIGTERM; the template kills and reaps every process below it, then exits (or
    is killed if it has not exited after a few seconds). The block waits for that,
    shielded from cancellation.

    Args:
        preload: Modules to import in the template before it is handed out.
        python: The interpreter to run (default: :data:`sys.executable`). It must
            run this process's Python version (major.minor), since the template
            imports from this process's ``sys.path``.
        env: The template's environment, as in :mod:`subprocess` (default: this
            process's).
        cwd: The template's working directory, as in :mod:`subprocess`.

    After :func:`start_early`, unless ``python`` is given, the template is forked
    from the early template instead of started: the same pristine template, with
    this process's current ``sys.path``, working directory and environment (or
    ``cwd`` and ``env``) applied to it. It is then a child of the early template.

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
    early = early_handle()
    if early is not None and python is None:
        async with early._open_aligned(modules, env, cwd) as template:
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
    :func:`open_template` without ``python=`` asks it to fork instead of starting an
    interpreter, so opening a template costs a fork, not an interpreter start-up. The
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
    """End the early template; :func:`open_template` starts interpreters again.

    Templates opened from it and still in use end too. Does nothing if
    :func:`start_early` has not run.
    """
    with _early.lock:
        early, _early.handle = _early.handle, None
    if early is not None:
        early.close()


def _forget_in_child() -> None:
    # A forked copy of this process owns no early template (see TemplateHandle._forget).
    _early.handle = None
    _early.lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
