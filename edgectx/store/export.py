"""Export a stored conversation as Markdown (to read or share) or JSON (to process; a stable format).

The JSON document, format "edgectx-conversation" version 1 (fields are only ever added within a version;
times are ISO 8601 in UTC, e.g. "2025-01-31T14:05:09Z"):

    {"format": "edgectx-conversation", "version": 1,
     "id": 7, "title": "Reading the report", "created": TIME, "updated": TIME,
     "model": {"name": "qwen2.5-1.5b" | null, "fingerprint": "a3f9..." | null},
     "system_prompt": "Answer briefly." | null,
     "settings": {...},
     "documents": [{"path": "report.pdf", "sha256": "...", "size_bytes": 1024, "n_chars": 980,
                    "n_tokens": 250 | null, "tokenizer": "a3f9..." | ""}],
     "messages": [{"position": 0, "role": "system" | "user" | "assistant", "content": "...",
                   "n_tokens": 12 | null, "timings": {"prefill_s": .., "decode_s": .., "tokens_per_s": ..}, "created": TIME}]}

    text = export_markdown(store, 7)
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from edgectx.store.conversations import ConversationStore, Message, StoredConversation
from edgectx.store.documents import StoredDocument

FORMAT = "edgectx-conversation"
VERSION = 1
UNTITLED = "Untitled conversation"


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load(store: ConversationStore, conversation_id: int) -> tuple[StoredConversation, list[Message], list[StoredDocument]]:
    with store.reading():  # one consistent state even while another process appends
        return (store.get_conversation(conversation_id), store.messages(conversation_id),
                store.documents.attached(conversation_id))


def conversation_dict(store: ConversationStore, conversation_id: int) -> dict:
    """The conversation as the documented version-1 JSON object."""
    conversation, messages, documents = _load(store, conversation_id)
    return {
        "format": FORMAT,
        "version": VERSION,
        "id": conversation.id,
        "title": conversation.title,
        "created": iso_utc(conversation.created_at),
        "updated": iso_utc(conversation.updated_at),
        "model": {"name": conversation.model_name, "fingerprint": conversation.model_fingerprint},
        "system_prompt": conversation.system_prompt,
        "settings": conversation.settings,
        "documents": [{"path": d.path, "sha256": d.sha256, "size_bytes": d.size_bytes, "n_chars": d.n_chars,
                       "n_tokens": d.n_tokens, "tokenizer": d.tokenizer} for d in documents],
        "messages": [{"position": m.position, "role": m.role, "content": m.content, "n_tokens": m.n_tokens,
                      "timings": m.timings, "created": iso_utc(m.created_at)} for m in messages],
    }


def export_json(store: ConversationStore, conversation_id: int) -> str:
    return json.dumps(conversation_dict(store, conversation_id), indent=2, ensure_ascii=False) + "\n"


def _message_footer(message: Message) -> str:
    parts = []
    if message.n_tokens is not None:
        parts.append(f"{message.n_tokens} tokens")
    rate = message.timings.get("tokens_per_s")
    if isinstance(rate, int | float):
        parts.append(f"{rate:.1f} tokens/s")
    return f"*{' · '.join(parts)}*" if parts else ""


def export_markdown(store: ConversationStore, conversation_id: int) -> str:
    """Title, metadata, attached documents, then each message under a heading naming its role."""
    conversation, messages, documents = _load(store, conversation_id)
    lines = [f"# {conversation.title or UNTITLED}", "",
             f"- Conversation: {conversation.id}",
             f"- Created: {iso_utc(conversation.created_at)}",
             f"- Updated: {iso_utc(conversation.updated_at)}"]
    if conversation.model_name or conversation.model_fingerprint:
        fingerprint = f" (fingerprint {conversation.model_fingerprint[:16]})" if conversation.model_fingerprint else ""
        lines.append(f"- Model: {conversation.model_name or 'unnamed'}{fingerprint}")
    if conversation.settings:
        lines.append("- Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(conversation.settings.items())))
    if conversation.system_prompt:
        lines += ["", "## System prompt", "", conversation.system_prompt]
    if documents:
        lines += ["", "## Documents", ""]
        for i, d in enumerate(documents, 1):
            tokens = f", {d.n_tokens:,} tokens" if d.n_tokens is not None else ""
            lines.append(f"{i}. `{d.path}` ({d.size_bytes:,} bytes{tokens}, sha256 {d.sha256[:12]})")
    for message in messages:
        lines += ["", f"## {message.role.capitalize()}", "", message.content]
        footer = _message_footer(message)
        if footer:
            lines += ["", footer]
    return "\n".join(lines) + "\n"
