"""The edge core: MQTT session, job state machine, protocol, offline queue and the umqtt
adapter. It is what a board freezes (firmware/manifest.py), and it runs unchanged on MicroPython
and CPython: it imports nothing outside itself but the standard library both have; engines,
MQTT clients and platform probes are passed in by the node around it (edge/)."""
