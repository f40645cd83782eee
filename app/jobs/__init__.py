"""Extraction jobs: the queue in the jobs table and the worker that runs them."""
