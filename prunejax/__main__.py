"""``python -m prunejax mnist`` — same as the ``prunejax`` console script."""

if __name__ == "__main__":
    from prunejax.apps.mnist.cli import main

    raise SystemExit(main())
