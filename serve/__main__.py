"""``python -m resserve.serve ...`` is the ``resserve`` command."""

from resserve.serve.app import main

main()
