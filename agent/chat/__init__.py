"""The terminal chat's logic, without the terminal (``agent/frontends/cli/chat.py`` draws the screen).

- :mod:`agent.chat.commands`: slash commands, the review parser, references by /refs number, id or file;
- :mod:`agent.chat.followups`: reading a follow-up (the LLM, or regular expressions) into a state update;
- :mod:`agent.chat.threads`: the chat threads in the checkpointer, through its API;
- :mod:`agent.chat.session`: :class:`ChatSession`, one conversation on one thread at a time.

The names other modules and the tests use are re-exported here (``from agent.chat import ChatSession``).
"""

from agent.chat.commands import (
    ALIASES,
    COMMANDS,
    NO_ARGUMENT,
    REVIEW_HELP,
    SlashCommand,
    check_reference_count,
    file_reference,
    parse_line,
    parse_review,
    reference_number,
    resolve_command,
    resolve_reference,
)
from agent.chat.followups import (
    MAX_FOLLOWUP_ROUNDS,
    FollowUp,
    follow_up_update,
    parse_followup,
    read_followup_with_llm,
    refine_prompt,
)
from agent.chat.session import (
    CUT_OFF,
    MAX_ROUNDS_PER_REQUEST,
    STOPPED_BY_USER,
    ChatSession,
    Proposal,
    RequestCancelled,
    Reviewer,
    verdict_text,
)
from agent.chat.threads import THREAD_PREFIX, list_threads, requests_of
from agent.thread_store import thread_ids

__all__ = [
    "ALIASES", "COMMANDS", "CUT_OFF", "MAX_FOLLOWUP_ROUNDS", "MAX_ROUNDS_PER_REQUEST", "NO_ARGUMENT", "REVIEW_HELP",
    "STOPPED_BY_USER", "THREAD_PREFIX", "ChatSession", "FollowUp", "Proposal", "RequestCancelled", "Reviewer",
    "SlashCommand", "check_reference_count", "file_reference", "follow_up_update", "list_threads", "parse_followup",
    "parse_line", "parse_review", "read_followup_with_llm", "reference_number", "refine_prompt", "requests_of",
    "resolve_command", "resolve_reference", "thread_ids", "verdict_text",
]
