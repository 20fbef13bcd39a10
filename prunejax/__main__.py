"""``python -m prunejax mnist`` — same as the ``prunejax`` console script."""

from prunejax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
