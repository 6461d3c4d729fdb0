"""Conversation history and session settings in SQLite or PostgreSQL, through SQLAlchemy 2 (async).

`database` opens the database, `migrate` brings its schema to this release's
(Alembic, `migrations/`), `models` are its tables, `repository` implements
`bot.ports.Repository` on them (with `queries`, `group_commit`, and on PostgreSQL the
per-conversation advisory locks of `locks`).
"""
