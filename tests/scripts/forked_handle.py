"""Fork a single-threaded program that holds a template handle.

Run as ``python -m tests.scripts.forked_handle`` from the repository root. The copy
must hold none of the handle's descriptors and leave its template alone; the original
must still use the handle afterwards. Exits 0 if so, with a traceback if not.
"""

from __future__ import annotations

import os

import trio

import trio_fork
from tests import targets
from tests.targets import open_fds


def main() -> None:
    with trio_fork.start_template(preload=["tests.targets"]) as handle:
        fds = (handle._requests.fileno(), handle._channel.fileno(), handle._pidfd)
        owned = {os.readlink(f"/proc/self/fd/{fd}") for fd in fds}
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            # The copy holds none of the handle's descriptors and leaves its process alone.
            ok = handle.closed and not owned & set(open_fds().values())
            handle.close()
            os.write(write_end, b"1" if ok else b"0")
            os._exit(0)
        os.close(write_end)
        try:
            assert os.read(read_end, 1) == b"1", "the copy held the handle's descriptors"
        finally:
            os.close(read_end)
            os.waitpid(pid, 0)
        assert not handle.closed

        async def use() -> None:
            async with handle.open() as template, template.spawn(targets.one_byte) as child:
                assert await child.stream.receive() == b"x"

        trio.run(use)


if __name__ == "__main__":
    main()
