"""The single-process runtime: one process consuming a config.

generation (Generation: one config's connection, topology, consumer pools and main
loop, reconnecting and repairing), generations (Generations: the process, its
signals, SIGHUP reloads replacing one generation by the next, the HTTP endpoint),
drain (``--exit-when-drained``'s watch).
"""
