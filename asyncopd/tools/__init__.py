"""Developer and operator tooling: the `asyncopd` command, the local stack, the benchmark harness."""
