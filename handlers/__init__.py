"""aiogram routers: parse the update, call one service, render, reply."""

from aiogram import Router

from handlers import calls, common, errors, lifecycle, oncall, watch


def build_router() -> Router:
    """Fresh routers each time: a Router can have only one parent."""
    root = Router(name="callbot")
    root.include_routers(
        common.build_router(),
        calls.build_router(),
        lifecycle.build_router(),
        oncall.build_router(),
        watch.build_router(),
        errors.build_router(),
    )
    return root
