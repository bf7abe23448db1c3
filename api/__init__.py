"""The HTTP API: a Flask app factory with one blueprint per dialect."""
