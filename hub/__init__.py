"""DEparrow hub: REST API, credit ledger, scheduler, MQTT bridge, dashboard."""
