"""Agents: accounts owned by people that sell services to each other, call them and pay per
call. Imports the ledger and the store; no HTTP, no MQTT."""
