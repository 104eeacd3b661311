"""`edgectx history` and `edgectx export` on a store in the test's own EDGECTX_HOME."""

from __future__ import annotations

import json
import re

import pytest

from edgectx.cli.main import main
from edgectx.store.conversations import ConversationStore


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def chats():
    """Two conversations in the default store ($EDGECTX_HOME/edgectx.db); the second updated last."""
    with ConversationStore() as store:
        birds = store.create_conversation("Birds", model_name="smollm2")
        store.add_message(birds.id, "user", "Why do penguins not fly?")
        store.add_message(birds.id, "assistant", "Their wings became flippers.", n_tokens=6)
        taxes = store.create_conversation("Taxes")
        store.add_message(taxes.id, "user", "When is the filing deadline?")
    return birds.id, taxes.id


def test_history_lists_newest_first_as_json(capsys, chats):
    birds, taxes = chats
    code, out, _ = _run(capsys, "history", "--json")
    assert code == 0
    entries = json.loads(out)
    assert [(e["id"], e["title"], e["messages"]) for e in entries] == [(taxes, "Taxes", 1), (birds, "Birds", 2)]
    assert entries[1]["model"] == "smollm2" and entries[0]["updated"].endswith("Z")


def test_history_table_shows_ids_titles_and_counts(capsys, chats):
    birds, taxes = chats
    code, out, _ = _run(capsys, "history")
    assert code == 0
    lines = out.splitlines()
    header = [cell.strip() for line in lines if line.startswith("┃") for cell in line.split("┃")[1:-1]]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert header == ["id", "title", "updated", "messages"]
    assert [(r[0], r[1], r[3]) for r in rows] == [(str(taxes), "Taxes", "1"), (str(birds), "Birds", "2")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", r[2]) for r in rows)


def test_history_search_filters_and_shows_the_match(capsys, chats):
    birds, _ = chats
    code, out, _ = _run(capsys, "history", "--search", "penguin", "--json")
    assert code == 0
    entries = json.loads(out)
    assert [e["id"] for e in entries] == [birds]
    assert "**penguins**" in entries[0]["snippet"]
    code, out, _ = _run(capsys, "history", "--search", 'NEAR( "', "--json")
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = _run(capsys, "history", "--search", "walrus")
    assert code == 0 and "No conversation matches." in out


def test_history_on_an_empty_store(capsys):
    code, out, _ = _run(capsys, "history")
    assert code == 0 and "No saved conversations yet." in out


def test_export_writes_markdown_to_stdout_and_json_to_a_file(capsys, chats, tmp_path):
    birds, _ = chats
    code, out, _ = _run(capsys, "export", str(birds))
    assert code == 0
    assert out.startswith("# Birds\n") and "## User\n\nWhy do penguins not fly?" in out and "## Assistant" in out
    target = tmp_path / "birds.json"
    code, out, err = _run(capsys, "export", str(birds), "--format", "json", "--out", str(target))
    assert code == 0 and out == "" and str(target) in err
    data = json.loads(target.read_text(encoding="utf-8"))
    assert (data["format"], data["version"], data["title"]) == ("edgectx-conversation", 1, "Birds")
    assert [m["content"] for m in data["messages"]] == ["Why do penguins not fly?", "Their wings became flippers."]


def test_export_of_an_unknown_id_is_one_sentence(capsys, chats):
    code, out, err = _run(capsys, "export", "999", "--format", "json")
    assert code != 0 and out == ""
    assert err.strip() == "edgectx: No conversation with id 999: `edgectx history` lists them."


def test_export_to_an_unwritable_place_is_one_sentence(capsys, chats, tmp_path):
    code, _, err = _run(capsys, "export", str(chats[0]), "--out", str(tmp_path / "missing" / "x.md"))
    assert code != 0 and err.startswith("edgectx: Cannot write") and "Traceback" not in err


def test_a_damaged_database_is_one_sentence(capsys, tmp_path, monkeypatch):
    home = tmp_path / "broken-home"
    home.mkdir()
    (home / "edgectx.db").write_bytes(b"\x00garbage" * 1000)
    monkeypatch.setenv("EDGECTX_HOME", str(home))
    code, out, err = _run(capsys, "history")
    assert code != 0 and out == ""
    assert err.startswith("edgectx: ") and "not an edgectx database" in err and len(err.strip().splitlines()) == 1
