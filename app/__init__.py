"""The Pool of Experts web service: FastAPI over a SQL-indexed artifact store."""
