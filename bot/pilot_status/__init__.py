"""Pilot Status calls API: the client, its models and its error tree."""

from bot.pilot_status.client import PilotStatusClient, RetryPolicy, build_http_client

__all__ = ["PilotStatusClient", "RetryPolicy", "build_http_client"]
