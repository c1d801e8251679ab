"""The table of states: every allowed change goes through, every other one raises, and the README shows the table."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from memories_ingest.files import Version
from memories_ingest.ledger import Ledger
from memories_ingest.states import ALLOWED, MEANINGS, STATES, IllegalChange, State

README = Path(__file__).resolve().parents[1] / "README.md"
FOLDER = Path("/videos")


def row_in(ledger: Ledger, state: State) -> int:
    """A row put straight into a state: the walk is about the table, not about the routes to each state."""
    ledger.record_seen(FOLDER / f"{state}.mp4", FOLDER, "scope", Version(100, 1, 7, 1))
    row = ledger.get(FOLDER / f"{state}.mp4")
    assert row is not None
    ledger._conn.execute("UPDATE files SET state = ? WHERE id = ?", [state, row.id])
    return row.id


def change(ledger: Ledger, row_id: int, to: State) -> None:
    with ledger._write() as conn:
        ledger._move(conn, row_id, to, "error = ?", [f"now {to}"])


def test_every_change_the_table_allows_is_made_and_every_other_raises_and_leaves_the_row(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    made = refused = 0
    for current, to in itertools.product(STATES, STATES):
        if current == to:
            continue
        row_id = row_in(ledger, current)
        if to in ALLOWED[current]:
            change(ledger, row_id, to)
            after = ledger.get_id(row_id)
            assert (after.state, after.error) == (to, f"now {to}")
            made += 1
        else:
            with pytest.raises(IllegalChange, match=f"from {current} to {to}"):
                change(ledger, row_id, to)
            after = ledger.get_id(row_id)
            assert (after.state, after.error) == (current, None)
            refused += 1
        ledger._conn.execute("DELETE FROM files WHERE id = ?", [row_id])
    assert made == sum(len(targets) for targets in ALLOWED.values())
    assert made + refused == len(STATES) * (len(STATES) - 1)


def test_every_state_has_a_meaning_and_can_be_left_and_reached() -> None:
    assert set(MEANINGS) == set(ALLOWED) == set(STATES)
    assert set().union(*ALLOWED.values()) == set(STATES)
    assert all(ALLOWED[state] - {state} for state in STATES)


def test_the_readme_state_table_is_the_module_s() -> None:
    section = README.read_text().split("### States", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    expected = [
        f"| `{state}` | {MEANINGS[state]} | {', '.join(f'`{to}`' for to in STATES if to in ALLOWED[state])} |"
        for state in STATES
    ]
    assert rows == expected, "README.md's table of states differs from memories_ingest.states:\n" + "\n".join(expected)
    assert re.search(r"\| state \| meaning \| may become \|", section)
