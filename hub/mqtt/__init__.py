"""The hub's MQTT side: the bridge (node and agent messages in, assignments and replies out:
bridge.py, with its connection in link.py and what each message does in messages.py), the
broker it starts, the broker's logins and ACLs, and the wire decoding of node messages.
Calls into the market and agents; imports nothing of the API or the web pages."""
