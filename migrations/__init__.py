"""Alembic environment and versions of the service's SQL schema (see app.store.db)."""
