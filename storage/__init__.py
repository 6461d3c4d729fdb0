"""SQLite persistence through SQLAlchemy 2 (async)."""
