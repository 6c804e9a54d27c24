"""Public classes that only trio_fork builds."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


class NoPublicConstructor(type):
    """A metaclass whose classes raise :exc:`TypeError` when called directly.

    The library builds them with ``cls._create(...)``; users get them from its
    functions (``open_template``, ``spawn``...), as trio's ``Process`` works.
    """

    def __call__(cls, *args: object, **kwargs: object) -> None:
        raise TypeError(
            f"trio_fork.{cls.__qualname__} has no public constructor: it is made by trio_fork"
        )

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]
