"""The admin API's actions, for the HTTP (`/admin/...`) and gRPC (`jaxserve.v1.Admin`) servers alike: the
caller has checked the admin key; each action validates its own fields (an APIError naming the field)."""

from __future__ import annotations

import dataclasses

from jaxserve.api.errors import NOT_FOUND, VALIDATION, APIError


def admin_state(frontend) -> dict:
    """Every model, its versions (state, traffic, memory, health, load report), the split history's last entry,
    and the recent events (loads, splits, rollbacks with their reasons)."""
    reg = frontend.registry
    return {
        "models": reg.describe(),
        "memory": {"in_use_bytes": reg.memory_in_use(), "budget_bytes": reg.memory_budget},
        "rollback_policy": dataclasses.asdict(reg.policy),
        "events": list(reg.events),
    }


ADMIN_ACTIONS = ("load", "unload", "split", "promote", "rollback")


def _str_field(body: dict, name: str, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise APIError(VALIDATION, f"{name}: {'required, ' if value is None else ''}must be a non-empty string", name)
    return value


async def admin_action(frontend, action: str, body: dict) -> dict:
    """One admin call (HTTP and gRPC alike): its answer, or an APIError naming the field."""
    reg = frontend.registry
    model = _str_field(body, "model")
    if action == "load":
        v = reg.load(model, _str_field(body, "version"), _str_field(body, "path", required=False))
        return {"model": v.name, "version": v.version, "state": v.state, "path": v.path}
    if action == "unload":
        timeout = body.get("timeout", 60.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 3600:
            raise APIError(VALIDATION, "timeout: seconds in [0, 3600]", "timeout")
        report = await reg.unload(model, _str_field(body, "version"), float(timeout))
        return {"model": model, "version": body["version"], "state": "available", "report": report}
    if action == "split":
        return {"model": model, "split": reg.set_split(model, body.get("split"))}
    if action == "promote":
        return {"model": model, "split": reg.promote(model, _str_field(body, "version"))}
    if action == "rollback":
        return {"model": model, "split": reg.rollback(model)}
    raise APIError(NOT_FOUND, f"admin: no action {action!r}", "path")
