"""The device agent's REST API: protocol.py (pydantic), logic.py, routes/, app.py (factory)."""
