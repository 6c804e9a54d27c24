# The bootstrap of a template process: the only code trio_fork starts as a string.
#
# The parent runs this file's source with ``python -c``, so it runs as the code of
# a pristine ``__main__``: it binds one name there and removes it. It either imports
# the worker side from the parent's trio_fork (``import``), or, where trio_fork is not
# installed, builds it from sources that the parent sends down the channel first
# (``sources``: an 8-byte length, then a marshalled {name: (is_package, source)}).
# Then it installs the parent's sys.path and serves the channel.
#
#   python -c BOOT how channel owner sigint_blocked root-or-"" path...


def _bootstrap() -> None:
    import sys

    how, channel, owner, sigint_blocked, root, *path = sys.argv[1:]
    del sys.argv[1:]
    if how == "import":
        sys.path.insert(0, root)
    else:
        import marshal
        import os

        fd = int(channel.split(":")[1])

        def read(size: int) -> bytes:
            data = b""
            while len(data) < size:
                chunk = os.read(fd, size - len(data))
                if not chunk:
                    raise SystemExit("trio_fork: the channel closed before the sources came")
                data += chunk
            return data

        sources = marshal.loads(read(int.from_bytes(read(8), "little")))
        spec_class = type(sys.__spec__)

        class Finder:
            @staticmethod
            def find_spec(name: str, path: object = None, target: object = None) -> object:
                if name not in sources:
                    return None
                spec = spec_class(name, Finder, origin=f"<trio_fork>/{name}")  # type: ignore[arg-type]
                if sources[name][0]:
                    spec.submodule_search_locations = []
                return spec

            @staticmethod
            def create_module(spec: object) -> None:
                return None

            @staticmethod
            def exec_module(module: object) -> None:
                name = module.__name__  # type: ignore[attr-defined]
                code = compile(sources[name][1], f"<trio_fork>/{name}", "exec")
                exec(code, vars(module))

            @staticmethod
            def get_source(name: str) -> str:
                return str(sources[name][1])

        sys.meta_path.insert(0, Finder)  # type: ignore[arg-type]
    from trio_fork.worker import _template

    sys.path[:] = path
    _template.start(channel, int(owner), sigint_blocked == "1")


if __name__ == "__main__":
    _bootstrap()
    del _bootstrap
