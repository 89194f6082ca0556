"""Pure logic and engine code, no Flask app and no server."""
