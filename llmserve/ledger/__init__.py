"""The usage ledger: one record per request, stored in SQLite or PostgreSQL, rolled up per hour, backed up.

One module per piece: ``records`` (what is stored), ``prices`` (what it costs), ``settings`` (the
``[ledger]`` settings), ``store`` (the tables and ``Ledger``), ``migrate`` (schema migrations),
``writer`` (batched writes on a native thread), ``backup`` (SQLite backups and restore), ``owner`` (one
owner among workers), ``jobs`` (rollups and backups, run by the owner), ``report`` (CSV and JSON).
Nothing is imported here, so the settings can use ``prices`` and ``settings`` without loading SQLAlchemy.
"""
