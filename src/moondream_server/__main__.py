"""``python -m moondream_server``: the same as the ``moondream-server`` command."""

from moondream_server.api.cli import main

if __name__ == "__main__":
    main()
