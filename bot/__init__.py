"""A chat bot that puts a local language model into Discord, Telegram and the terminal."""

__version__ = "0.1.0"
