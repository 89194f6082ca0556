"""The HTTP layer through Flask's test client, on tiny local models; no server."""
