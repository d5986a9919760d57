"""The runtime: what a process runs to own names and drive their loops.

One module per section of :mod:`batchloop.protocol`; the host composes them.
"""
