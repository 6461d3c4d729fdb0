"""The Telegram adapter on python-telegram-bot.

`events` turns native messages into the common event, `transport` is PTB's HTTP on
aiohttp, `rate_limiter` retries Bot API calls, `delivery` sends the replies, and
`adapter` runs it all (`adapters.telegram.adapter.TelegramAdapter`).
"""
