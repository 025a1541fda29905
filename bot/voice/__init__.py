"""Voice: espeak-ng speech, and the bot as the WebRTC end of Meta calls.

Nothing here imports aiortc or PyAV at import time; `bot.voice.webrtc` is loaded on the first
Meta call (`service.LazyEndpoint`).
"""
