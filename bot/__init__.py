"""callbot: start WhatsApp voice calls through Pilot Status from Telegram."""
