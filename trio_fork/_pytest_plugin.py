"""The pytest plugin: a fresh template for each test, forked from one per session.

Registered through the ``pytest11`` entry point as ``trio_fork`` (``-p no:trio_fork``
disables it). It does nothing until a test asks for ``fork_template``: only then is the
session's template started, once, and it ends with the session. If it dies (the OOM
killer, say), the next test that needs it starts another.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import attrs
import pytest

from ._arguments import module_names
from ._handle import TemplateHandle, start_template
from ._isolated import LeftoverProcessesError, open_isolated_template
from ._template import Template


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "trio_fork_preload",
        type="args",
        default=[],
        help="modules that the session's trio_fork template imports once, for every test",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "trio_fork_preload(*modules): modules that this test's fork_template imports, on top "
        "of the trio_fork_preload ini option",
    )


@attrs.define(eq=False)
class _SessionTemplate:
    """The session's template: started on first use, and again if it died."""

    preload: list[str]
    handle: TemplateHandle | None = None

    def current(self) -> TemplateHandle:
        handle = self.handle
        if handle is not None and (handle.closed or handle._broken or handle._exited()):
            handle.close()  # reap it
            handle = None
        if handle is None:
            handle = self.handle = start_template(preload=self.preload)
        return handle

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


@pytest.fixture(scope="session")
def _trio_fork_session(pytestconfig: pytest.Config) -> Iterator[_SessionTemplate]:
    preload = module_names(pytestconfig.getini("trio_fork_preload"), "trio_fork_preload")
    session = _SessionTemplate(preload)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def trio_fork_session_template(_trio_fork_session: _SessionTemplate) -> TemplateHandle:
    """The session's template, started on first use with ``trio_fork_preload`` imported.

    A :class:`~trio_fork.TemplateHandle`: ``fork_template`` forks it for each test, and
    a test can open more forks of it with ``async with handle.open() as template``.
    It is the same for every test of the session, unless it dies: then the next test
    that asks gets a new one.
    """
    return _trio_fork_session.current()


@pytest.fixture
async def fork_template(
    request: pytest.FixtureRequest, trio_fork_session_template: TemplateHandle
) -> AsyncIterator[Template]:
    """A :class:`~trio_fork.Template` of the test's own, forked from the session's.

    It is what ``open_template()`` would start at set-up (this process's ``sys.path``,
    working directory and environment), with the ``trio_fork_preload`` modules and
    those of the test's ``trio_fork_preload`` markers imported, for the cost of a fork.
    At teardown it ends, and everything it started ends with it; if a process it
    started outlived the block that started it, the test fails and says which.
    """
    preload = module_names(
        [name for marker in request.node.iter_markers("trio_fork_preload") for name in marker.args],
        "the trio_fork_preload marker",
    )
    leftovers: LeftoverProcessesError | None = None
    try:
        async with open_isolated_template(trio_fork_session_template, preload) as template:
            yield template
    except LeftoverProcessesError as exc:
        leftovers = exc
    if leftovers is not None:
        # Outside the except clause: the report shows the message alone.
        pytest.fail(f"fork_template: {leftovers}", pytrace=False)
