"""The one exception type for bad input: :class:`UserError` (no imports, every layer may
raise it).

A ``UserError`` says what the caller gave that cannot work (a value out of range, a file
that is missing or damaged, flags that contradict each other) and what would; the command
line prints it as one ``error: ...`` line and exits with status 2. Any other exception is a
bug in subspace-jax: the command line keeps its traceback and asks for a report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input (an argument, a flag, a file, a dataset), reported without a traceback.

    A ``ValueError`` subclass, so code catching ``ValueError`` keeps working. The message
    names the bad value and what is allowed.

    Example:
      >>> try:
      ...     raise UserError("d = 0 is out of range: allowed 1..100")
      ... except ValueError as e:
      ...     print(e)
      d = 0 is out of range: allowed 1..100
    """


@contextlib.contextmanager
def as_user_error() -> Iterator[None]:
    """Re-raise the ``ValueError`` of a validator that states bad input as a :class:`UserError`.

    For checks whose every ``ValueError`` is about the caller's input (``validate_config``,
    ``check_data_fits``, a layout's sizes) but that raise plain ``ValueError``; the original
    stays chained as ``__cause__``. Wrap the validator alone, never work that could fail for
    another reason.
    """
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from e
