"""batchloop recipes: the patterns batchloop exists for, each a runnable module.

Run one from the repository root against a database (each creates its own tables)::

    DATABASE_URL=postgresql://user@localhost/mydb python -m examples.recipes.llm_poller

Each module's docstring says what it shows; tests/test_recipes.py runs every one of them on a
real PostgreSQL with a real host (or ``tick``).
"""
