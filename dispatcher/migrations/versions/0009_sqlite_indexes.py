"""SQLite: fixed planner statistics, so lookups by id or batch do not scan a status

Create Date: 2026-11-30 05:00:00
"""

from alembic import op

revision = "0009_sqlite_indexes"
down_revision = "0008_receipt_indexes"


# sqlite_stat1 rows (https://sqlite.org/fileformat2.html#stat1tab): "N a b" is the
# rows in the index, then the rows one value of its first column (of its first two)
# matches. Without statistics SQLite guesses the same for every index, and took
# the status index for statements that also name ids, a batch or message ids: the
# claim scanned every queued recipient of every batch, the record every sending
# one, a receipt group every sent one, a callback's outcome every delivering
# callback. A status or state matches many rows, an id one, a batch a chunk's
# worth. Written once by hand rather than measured by ANALYZE: a young database
# would be measured while small or empty, and ANALYZE reads the whole table.
STATS = {
    ("recipients", "sqlite_autoindex_recipients_1"): "1000000 1",
    ("recipients", "ix_recipients_batch_seq"): "1000000 1000 1",
    ("recipients", "ix_recipients_status_next"): "1000000 200000 100000",
    ("recipients", "ix_recipients_provider_ref"): "1000000 1",
    ("callbacks", "sqlite_autoindex_callbacks_1"): "1000000 1",
    ("callbacks", "ix_callbacks_batch_id"): "1000000 3000",
    ("callbacks", "ix_callbacks_state_next"): "1000000 250000 10",
    ("callbacks", "ix_callbacks_account_state"): "1000000 100000 30000",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # Creates sqlite_stat1 if it is missing; reads only the (small) schema table.
    op.execute("ANALYZE sqlite_schema")
    _delete()
    for (table, index), stat in STATS.items():
        op.execute(
            f"INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ('{table}', '{index}', '{stat}')"
        )
    # Connections read the statistics when they load the schema; this one does now.
    op.execute("ANALYZE sqlite_schema")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    _delete()


def _delete() -> None:
    for table, index in STATS:
        op.execute(f"DELETE FROM sqlite_stat1 WHERE tbl = '{table}' AND idx = '{index}'")
