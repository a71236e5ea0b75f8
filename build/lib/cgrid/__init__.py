"""Shared core of cgrid-s2s: the event model, settings, errors and the ledger layout.

Both the producer (what auction code imports) and the worker (the Celery fleet) build on
this package, so neither has to import the other.
"""
