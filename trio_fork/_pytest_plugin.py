"""The pytest plugin: a fresh template for each test, forked from one per session.

Registered through the ``pytest11`` entry point as ``trio_fork`` (``-p no:trio_fork``
disables it). It does nothing until a test asks for ``fork_template``: only then is the
session's template started, once, and it ends with the session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

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


@pytest.fixture(scope="session")
def trio_fork_session_template(pytestconfig: pytest.Config) -> Iterator[TemplateHandle]:
    """The session's template, started on first use with ``trio_fork_preload`` imported.

    A :class:`~trio_fork.TemplateHandle`: ``fork_template`` forks it for each test, and
    a test can open more forks of it with ``async with handle.open() as template``.
    """
    preload = module_names(pytestconfig.getini("trio_fork_preload"), "trio_fork_preload")
    with start_template(preload=preload) as handle:
        yield handle


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
