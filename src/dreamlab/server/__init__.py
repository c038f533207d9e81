"""HTTP API, persistent job queue, gallery and web UI (``dreamlab serve``): thin, no sampling logic.

``create_app`` (in ``app``) builds the ASGI app; ``cli.add_cli`` adds the ``serve`` sub-command."""
