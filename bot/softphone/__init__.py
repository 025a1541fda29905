"""The Mini App softphone: an operator talks with the callee from inside Telegram."""
