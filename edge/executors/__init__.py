"""Job executors: each backend its own module, imported only on machines that have it."""
