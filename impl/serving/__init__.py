"""Project 28: serving our engine over HTTP, OpenAI-compatible (``python -m impl.serving api|router|up``).

``app.create_app(ServerConfig(model=...))`` is one worker's FastAPI app (``server``: its state and each
generation's steps; ``middleware``: request ids, API key, body limit); ``async_engine.AsyncEngine`` the thread
that owns the engine; ``protocol`` the wire format; ``detokenize`` the streaming detokenizer; ``metrics`` the
Prometheus series; ``router`` and ``up`` the load balancer and the one-command deployment;
``testing.running_server`` starts a real server for tests. See README.md.
"""
