"""Depth-wise parallelism: partitioning, the schedule IR and its generators, the runtime."""
