"""Migrations up and down on both backends, through the functions and `poe db`."""

from service_fixtures import make_settings, settings_env
from sqlalchemy import inspect
from typer.testing import CliRunner

from app.cli import app
from app.store import db
from app.store.tables import Base

TABLES = set(Base.metadata.tables)


def _tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(databases):
    url = databases.new()
    db.upgrade(url)
    assert _tables(url) == TABLES
    assert db.current_revision(url) == "0002"
    db.downgrade(url, "base")
    assert _tables(url) == set()
    assert db.current_revision(url) is None
    db.upgrade(url)
    assert _tables(url) == TABLES


def test_migrations_match_the_tables(databases):
    """The migrations create exactly what the SQLAlchemy models declare."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    url = databases.new()
    db.upgrade(url)
    engine = db.make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_poe_db_commands(databases, tmp_path):
    settings = make_settings(databases, tmp_path)
    runner = CliRunner()
    env = settings_env(settings)
    result = runner.invoke(app, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert _tables(settings.db_url) == TABLES
    result = runner.invoke(app, ["db", "downgrade", "base"], env=env)
    assert result.exit_code == 0, result.output
    assert _tables(settings.db_url) == set()
