# The bootstrap of a template: the only code trio_fork runs from a string (python -c),
# as the code of a pristine __main__, where it binds one name and removes it. Where
# trio_fork is not installed, the parent first sends the worker side's sources down
# the channel (an 8-byte length, then a marshalled {name: (is_package, source)}).
#   python -c BOOT import|sources CHANNEL OWNER SIGINT_BLOCKED PACKAGE_ROOT PATH...
# CHANNEL: socket:FD, pipes:READ:WRITE, or relay:READ:WRITE (a remote template's).


def _bootstrap() -> None:
    import sys

    how, channel, owner, sigint_blocked, root, *path = sys.argv[1:]
    del sys.argv[1:]
    if how == "import":
        sys.path.insert(0, root)
    else:
        import marshal
        import os

        def read(size: int) -> bytes:
            data = b""
            while len(data) < size:
                data += os.read(int(channel.split(":")[1]), size - len(data)) or sys.exit(1)
            return data

        sources = marshal.loads(read(int.from_bytes(read(8), "little")))

        class Finder:  # serves the sources; get_source() lets tracebacks show them
            @staticmethod
            def find_spec(name: str, path: object = None, target: object = None) -> object:
                if name not in sources:
                    return None
                spec = type(sys.__spec__)(name, Finder, origin=f"<trio_fork>/{name}")  # type: ignore[arg-type]
                spec.submodule_search_locations = [] if sources[name][0] else None
                return spec

            @staticmethod
            def create_module(spec: object) -> None:
                return None

            @staticmethod
            def exec_module(module: object) -> None:
                name = module.__name__  # type: ignore[attr-defined]
                exec(compile(sources[name][1], f"<trio_fork>/{name}", "exec"), vars(module))

            @staticmethod
            def get_source(name: str) -> str:
                return str(sources[name][1])

        sys.meta_path.insert(0, Finder)  # type: ignore[arg-type]
    # A remote template's channel is a relay's (see _relay): it forks the template.
    server = "_relay" if channel.startswith("relay:") else "_template"
    module = __import__(f"trio_fork.worker.{server}", fromlist=["start"])
    sys.path[:] = path or sys.path
    module.start(channel, int(owner), sigint_blocked == "1")


if __name__ == "__main__":
    _bootstrap()
    del _bootstrap
