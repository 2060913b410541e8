"""Writes the conversation and OpenAI Batch samples. Deterministic: rerunning gives identical files.

python data/make_conversations.py   # data/conversations.parquet, data/batch_requests.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

HERE = Path(__file__).resolve().parent

TOPICS = ["a kettle that leaks", "a late delivery", "a refund", "a broken zip", "a missing manual", "a noisy fan"]
FOLLOW_UPS = ["What should I do next?", "Is that covered by the warranty?", "How long will it take?"]


def conversations(n: int = 24) -> pl.DataFrame:
    """Multi-turn support chats as a Parquet list<struct<role, content>> column, one chat per row."""
    ids, chats = [], []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        chat = [
            {"role": "user", "content": f"Hello, I am writing about {topic} (case {1000 + i})."},
            {"role": "assistant", "content": f"Sorry to hear about {topic}. Could you tell me more?"},
            {"role": "user", "content": f"It happened {1 + i % 9} days ago. {FOLLOW_UPS[i % len(FOLLOW_UPS)]}"},
        ]
        if i % 4 == 0:  # some chats carry their own system message
            chat.insert(0, {"role": "system", "content": "The customer prefers short answers."})
        ids.append(f"chat-{i:03d}")
        chats.append(chat)
    schema = {"chat_id": pl.String, "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String}))}
    return pl.DataFrame({"chat_id": ids, "messages": chats}, schema=schema)


def batch_requests(n: int = 20) -> list[dict[str, object]]:
    """An OpenAI Batch input file: custom_id, method, url, body (with its own sampling fields)."""
    lines = []
    for i in range(n):
        body: dict[str, object] = {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Translate the user's sentence into French."},
                {"role": "user", "content": f"Sentence {i}: {TOPICS[i % len(TOPICS)]} was sorted out today."},
            ],
            "max_tokens": 60,
        }
        if i % 2:
            body["temperature"] = 0.2
        lines.append({"custom_id": f"request-{i + 1}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return lines


def main() -> None:
    conversations().write_parquet(HERE / "conversations.parquet")
    text = "".join(json.dumps(line) + "\n" for line in batch_requests())
    (HERE / "batch_requests.jsonl").write_text(text)


if __name__ == "__main__":
    main()
