"""``python -m pyro_bmr``: the ``pyro-bmr`` command of :mod:`pyro_bmr.paper.cli`."""

from pyro_bmr.paper.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
