"""The hub's storage: the SQLite database (one writer, BEGIN IMMEDIATE, recorded migrations,
commits off the event loop) and the rows of users, nodes, jobs and blobs. The bottom room:
imports nothing else of the hub."""
