"""The job market: the job spec, admission and settlement (jobs), attempts settled once, the
scheduler, verification by replicas, reputation, service billing and the uptime and referral
bonuses. Imports the ledger and the store; no HTTP, no MQTT."""
