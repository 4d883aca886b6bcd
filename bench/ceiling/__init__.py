"""Raw ceilings: what bare clients (no project code) get from PostgreSQL and Kafka on this machine.

The project's own figures are divided by these, measured in the same run, so a ratio says how
much of the stack's capacity our code uses, whatever machine the run is on.
"""
