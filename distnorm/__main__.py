"""``python -m distnorm``: the ``distnorm`` command (see :mod:`distnorm.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
