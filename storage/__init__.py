"""Conversation history and session settings in SQLite or PostgreSQL, through SQLAlchemy 2 (async).

`database` opens the database, `models` are its tables, `repository` implements
`bot.ports.Repository` on them (with `queries` and `group_commit`).
"""
