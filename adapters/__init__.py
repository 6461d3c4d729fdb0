"""Platform adapters: each turns native messages into `bot.events.IncomingMessage`."""
