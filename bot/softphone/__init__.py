"""The softphone: an operator talks on a call from a Telegram Mini App."""
