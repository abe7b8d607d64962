"""``python -m resserve.serve ...`` is the ``resserve`` command."""

from resserve.serve.app import main

if __name__ == "__main__":  # not when a worker process (serve/workers/) imports it as __mp_main__
    main()
