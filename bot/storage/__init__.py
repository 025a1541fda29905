"""Storage: SQLAlchemy 2 (async) on SQLite by default, PostgreSQL when DATABASE_URL says so."""
