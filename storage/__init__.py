"""Conversation history and session settings in SQLite or PostgreSQL, through SQLAlchemy 2 (async).

`database` opens the database, `migrate` brings its schema to this release's
(Alembic, `migrations/`), `models` are its tables, `repository` implements
`bot.ports.Repository` on them (its durable turns in `turns`, the unit of work that
writes a group commit's batch in `batch`, operator controls in `controls`; statements in
`queries`, the queue in `group_commit`, and on PostgreSQL the per-conversation advisory
locks of `locks`). `health` keeps one process per SQLite file and watches the file.
"""
