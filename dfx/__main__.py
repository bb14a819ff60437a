"""``python -m dfx`` (what torchrun launches): the same as the ``dfx`` command."""

from dfx.cli import main

main()
