"""``python -m bench``: the same workloads on armonik_zmq and its peers (see ``bench/cli.py``)."""

from .cli import main

main()
