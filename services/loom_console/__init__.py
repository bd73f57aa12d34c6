"""``loom console``: a web console for runs, reading only through the declared routes the
CLI uses (``loom_infra.client``), as the operator identity. ``app.build_app`` is the
Starlette app, ``server.ConsoleServer`` runs it with uvicorn, ``static/`` holds the page."""
