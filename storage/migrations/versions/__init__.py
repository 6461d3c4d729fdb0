"""One Alembic revision per file, applied in order by `storage.migrate`."""
