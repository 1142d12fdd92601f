"""What the agent is doing, in words: the live status line of the terminal and of the web page."""

from __future__ import annotations

from typing import Any


def activity(event: dict[str, Any]) -> str | None:
    """What the agent is doing, for a live status line: the text of a tool, denoising or LLM event, else None."""
    kind = event["event"]
    if kind == "tool_start":
        return f"{event['tool']} …"
    if kind == "denoise":
        return f"drawing, step {event['step']}/{event['total']}"
    if kind == "llm_start":
        return f"the LLM chooses the next step (try {event['attempt']})"
    return None
