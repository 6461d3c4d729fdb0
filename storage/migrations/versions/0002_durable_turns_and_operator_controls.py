"""Durable turns and operator controls.

Revision ID: 0002
Revises: 0001

- `turns`: every accepted incoming message, unique by (platform, chat_id,
  platform_message_id), with its state, so redeliveries are recognised and turns
  accepted before a restart are answered after it;
- `messages.status`: "cut_off" replies and "hidden" messages that prompts skip;
- `daily_usage`, `blocks`, `chat_settings`: quotas, `/block`, and chat-wide settings.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_OPEN = sa.text("state IN ('pending', 'undelivered')")


def upgrade() -> None:
    op.create_table(
        "blocks",
        sa.Column("entry", sa.String(length=160), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("entry"),
    )
    op.create_table(
        "chat_settings",
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("chat_id", sa.String(length=64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("platform", "chat_id"),
    )
    op.create_table(
        "daily_usage",
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("generated_tokens", sa.Integer(), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("platform", "user_id", "day"),
    )
    op.create_table(
        "turns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(length=16), nullable=False),
        sa.Column("chat_id", sa.String(length=64), nullable=False),
        sa.Column("platform_message_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("display_name", sa.String(length=256), nullable=False),
        sa.Column("is_private", sa.Boolean(), nullable=False),
        sa.Column("thread_id", sa.String(length=64), nullable=True),
        sa.Column("message_id", sa.Integer(), nullable=True),
        sa.Column("reply_id", sa.Integer(), nullable=True),
        sa.Column("reply_message_ids", sa.JSON(), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["reply_id"], ["messages.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("platform", "chat_id", "platform_message_id", name="uq_turns_platform_message"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_turns_open", "turns", ["platform", "id"], sqlite_where=_OPEN, postgresql_where=_OPEN)
    op.create_index("ix_turns_message_id", "turns", ["message_id"])
    op.create_index("ix_turns_reply_id", "turns", ["reply_id"])
    op.add_column("messages", sa.Column("status", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch_op:
        batch_op.drop_column("status")
    op.drop_index("ix_turns_reply_id", table_name="turns")
    op.drop_index("ix_turns_message_id", table_name="turns")
    op.drop_index("ix_turns_open", table_name="turns")
    op.drop_table("turns")
    op.drop_table("daily_usage")
    op.drop_table("chat_settings")
    op.drop_table("blocks")
