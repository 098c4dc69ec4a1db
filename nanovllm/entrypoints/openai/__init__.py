"""The OpenAI-compatible server: protocol.py (the wire format), one serving_*.py per endpoint family,
api_server.py (the app wiring routes, errors, auth and shutdown). Needs the `serve` extra."""
