"""Tidings benchmarks: the stack's raw ceilings and the project's own figures (``make bench``).

``python -m bench`` runs every registered benchmark against the local native stack and writes
``bench/results.json``; see ``bench/README.md`` for how to add one.
"""
