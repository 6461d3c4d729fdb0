"""Alembic migrations of the bot's schema; `storage.migrate` runs them (`versions/` holds one
file per revision, `0001` being the schema of the first release)."""
