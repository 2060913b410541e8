"""Conversation rows (``prompt.messages_column``): whole message lists sent as they are, through the CLI,
over real HTTP to the local API, with real Parquet and a real ledger."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import orjson
import polars as pl
from click.testing import CliRunner, Result
from PIL import Image

from pipeline.cli import main
from pipeline.job.spec import load_spec
from pipeline.localapi import LocalAPI
from pipeline.requests.prepare import iter_requests, prepare
from tests.helpers import ROOT, example_job, run, to_toml

MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, [*args])


def chat(i: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"My order {i} has not arrived."},
        {"role": "assistant", "content": "Sorry about that. When did you order?"},
        {"role": "user", "content": f"{i} days ago. What now?"},
    ]


def write_conv_job(tmp: Path, api: LocalAPI, input_name: str, **prompt: Any) -> Path:
    data = {
        "job": {"input": input_name, "output": "out/result.parquet", "id_column": "chat_id"},
        "model": {"max_tokens": 32},
        "prompt": {"messages_column": "messages", **prompt},
        "endpoint": {"preset": "local", "base_url": api.base_url},
    }
    job = tmp / "job.toml"
    job.write_text(to_toml(data))
    return job


def sent_bodies(job: Path) -> dict[str, dict[str, Any]]:
    """The request bodies a run of ``job`` sends, by row key (what ``prompts`` built; nothing is sent)."""
    p = prepare(load_spec(job), need_key=False)
    return {r.row_key: orjson.loads(r.body) for chunk in iter_requests(p) for r in chunk}


def png(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (8, 8), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_parquet_message_lists_run_and_keep_their_column(tmp_path: Path, api: LocalAPI) -> None:
    frame = pl.DataFrame({"chat_id": [f"c-{i}" for i in range(6)], "messages": [chat(i) for i in range(6)]})
    frame = frame.with_columns(pl.col("messages").cast(MESSAGES))
    frame.write_parquet(tmp_path / "chats.parquet")
    job = write_conv_job(tmp_path, api, "chats.parquet", system="You are a support agent.")

    result = cli("run", str(job), "--no-progress")

    assert result.exit_code == 0, result.output
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.schema["messages"] == MESSAGES  # the input column is written back with its type
    assert out.get_column("status").to_list() == ["ok"] * 6
    assert api.stats()["received"] == 6
    body = sent_bodies(job)["c-2"]
    assert body["messages"] == [{"role": "system", "content": "You are a support agent."}, *chat(2)]
    # A rerun sends nothing: the hash covers the messages, and they did not change.
    assert cli("run", str(job), "--no-progress").exit_code == 0
    assert api.stats()["received"] == 6


def test_editing_one_conversation_resends_only_that_row(tmp_path: Path, api: LocalAPI) -> None:
    rows = [json.dumps(chat(i)) for i in range(5)]
    pl.DataFrame({"chat_id": [f"c-{i}" for i in range(5)], "messages": rows}).write_csv(tmp_path / "chats.csv")
    job = write_conv_job(tmp_path, api, "chats.csv")
    assert cli("run", str(job), "--no-progress").exit_code == 0
    assert api.stats()["received"] == 5

    edited = chat(3)
    edited[-1]["content"] = "Three days ago. Can I cancel?"
    rows[3] = json.dumps(edited)
    pl.DataFrame({"chat_id": [f"c-{i}" for i in range(5)], "messages": rows}).write_csv(tmp_path / "chats.csv")
    assert cli("run", str(job), "--no-progress").exit_code == 0
    assert api.stats()["received"] == 6


def test_row_system_message_is_joined_to_the_jobs(tmp_path: Path, api: LocalAPI) -> None:
    own = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    plain = [{"role": "user", "content": "Hi"}]
    frame = pl.DataFrame({"chat_id": ["own", "plain"], "messages": [json.dumps(own), json.dumps(plain)]})
    frame.write_csv(tmp_path / "chats.csv")
    job = write_conv_job(tmp_path, api, "chats.csv", system="Be brief.")
    bodies = sent_bodies(job)
    assert bodies["own"]["messages"] == [
        {"role": "system", "content": "Be brief.\n\nAnswer in French."},
        {"role": "user", "content": "Hello"},
    ]
    assert bodies["plain"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


BAD_CELLS = {
    "bad-json": ('[{"role": "user", "content": "hi"', "not valid JSON"),
    "not-a-list": ('{"role": "user", "content": "hi"}', "not a list of messages (an object)"),
    "no-role": ('[{"content": "hi"}]', "message 1 has no role"),
    "unknown-role": ('[{"role": "robot", "content": "hi"}]', "message 1: unknown role 'robot'"),
    "bad-part": ('[{"role": "user", "content": [{"type": "audio"}]}]', "unknown content part type 'audio'"),
    "no-content": ('[{"role": "user"}]', "message 1 (user) has no content"),
}


def test_bad_cells_are_row_errors_found_before_sending(tmp_path: Path, api: LocalAPI) -> None:
    ids = ["good-1", *BAD_CELLS, "empty", "good-2"]
    cells = [json.dumps(chat(1)), *(c for c, _ in BAD_CELLS.values()), None, json.dumps(chat(2))]
    pl.DataFrame({"chat_id": ids, "messages": cells}).write_csv(tmp_path / "chats.csv")
    job = write_conv_job(tmp_path, api, "chats.csv")

    result = cli("run", str(job), "--no-progress")

    assert result.exit_code == 1, result.output
    assert api.stats()["received"] == 2  # only the good rows reached the server
    out = {r["chat_id"]: r for r in pl.read_parquet(tmp_path / "out" / "result.parquet").iter_rows(named=True)}
    assert out["good-1"]["status"] == out["good-2"]["status"] == "ok"
    assert out["empty"]["status"] == "skipped"
    for key, (_, fragment) in BAD_CELLS.items():
        assert out[key]["status"] == "error"
        assert out[key]["error_kind"] == "messages"
        assert out[key]["error"].startswith(f"row {key!r}: column 'messages': "), out[key]["error"]
        assert fragment in out[key]["error"]
    assert "errors" in result.output and "kind=messages" in result.output


def test_jsonl_messages_with_mixed_content_and_local_images(tmp_path: Path, api: LocalAPI) -> None:
    """Content as text on one line and as parts on another reads (the column is kept as JSON text); a local
    image path inside a message is sent as its bytes, so the hash follows the file's content."""
    (tmp_path / "cat.png").write_bytes(png(1))
    photo = str(tmp_path / "cat.png")
    lines = [
        {"chat_id": "text", "messages": [{"role": "user", "content": "Describe a cat."}]},
        {
            "chat_id": "image",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": photo}},
                    ],
                }
            ],
        },
        {
            "chat_id": "missing",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "nope.png"}]}],
        },
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    job = write_conv_job(tmp_path, api, "chats.jsonl")

    assert cli("run", str(job), "--no-progress").exit_code == 1
    out = {r["chat_id"]: r for r in pl.read_parquet(tmp_path / "out" / "result.parquet").iter_rows(named=True)}
    assert out["text"]["status"] == out["image"]["status"] == "ok"
    assert f"[image:{hashlib.sha256(png(1)).hexdigest()[:12]}]" in out["image"]["content"]
    assert out["missing"]["status"] == "error"
    assert "message 1, part 1: image file not found: nope.png" in out["missing"]["error"]
    assert api.stats()["received"] == 2

    (tmp_path / "cat.png").write_bytes(png(2))  # the same path, other bytes: that row is sent again
    cli("run", str(job), "--no-progress")
    assert api.stats()["received"] == 3


def test_a_column_of_the_wrong_type_is_a_load_error(tmp_path: Path, api: LocalAPI) -> None:
    pl.DataFrame({"chat_id": ["a", "b"], "messages": [1, 2]}).write_csv(tmp_path / "chats.csv")
    job = write_conv_job(tmp_path, api, "chats.csv")
    result = cli("run", str(job), "--no-progress")
    assert result.exit_code == 2
    assert "column 'messages' is Int64; prompt.messages_column needs a list of {role, content}" in result.output
    assert api.stats()["received"] == 0


def test_example_job_runs_on_the_local_api(tmp_path: Path, api: LocalAPI) -> None:
    spec = example_job("conversations.toml", tmp_path, api)
    summary = run(spec)
    source = pl.read_parquet(ROOT / "data" / "conversations.parquet")
    out = pl.read_parquet(spec.job.output)
    assert summary.rows_by_status == {"ok": source.height}
    assert out.get_column("chat_id").to_list() == source.get_column("chat_id").to_list()
    assert out.schema["messages"] == source.schema["messages"]


def test_strict_inputs_stop_the_run_on_a_bad_message_list(tmp_path: Path, api: LocalAPI) -> None:
    cells = [
        json.dumps(chat(1)),
        json.dumps([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "gone.png"}}]}]),
        json.dumps([{"role": "robot", "content": "hi"}]),
    ]
    pl.DataFrame({"chat_id": ["ok", "gone", "robot"], "messages": cells}).write_csv(tmp_path / "chats.csv")
    job = write_conv_job(tmp_path, api, "chats.csv")

    result = cli("run", str(job), "--no-progress", "--strict-inputs")

    assert result.exit_code == 2
    assert result.output.strip() == (
        "seedbatch: error: 2 row(s) hold messages that cannot be sent and media.strict_inputs is on; nothing was "
        "sent: row 'gone': column 'messages': message 1, part 1: image file not found: gone.png; "
        "row 'robot': column 'messages': message 1: unknown role 'robot'; use one of system, user, assistant, tool"
    )
    assert api.stats()["received"] == 0


def test_parquet_parts_with_image_bytes(tmp_path: Path, api: LocalAPI) -> None:
    """A Parquet column of content parts, the image as raw bytes: sent as a data URI of those bytes."""
    part = pl.Struct({"type": pl.String, "text": pl.String, "image_url": pl.Struct({"url": pl.Binary})})
    dtype = pl.List(pl.Struct({"role": pl.String, "content": pl.List(part)}))
    messages = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What colour is this?", "image_url": None},
                    {"type": "image_url", "text": None, "image_url": {"url": png(i)}},
                ],
            }
        ]
        for i in range(3)
    ]
    frame = pl.DataFrame(
        {"chat_id": ["a", "b", "c"], "messages": messages}, schema={"chat_id": pl.String, "messages": dtype}
    )
    frame.write_parquet(tmp_path / "chats.parquet")
    job = write_conv_job(tmp_path, api, "chats.parquet")

    assert cli("run", str(job), "--no-progress").exit_code == 0
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    for i, content in enumerate(out.get_column("content")):
        assert f"[image:{hashlib.sha256(png(i)).hexdigest()[:12]}]" in content
