"""Credits: the double-entry ledger, its group-commit writer, and the economy's rules (what a
job costs, what a node earns). Imports only hub.store below it."""
