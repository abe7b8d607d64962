"""``python -m resserve.serve ...`` is the ``resserve`` command."""

from resserve.serve.cli import main

main()
