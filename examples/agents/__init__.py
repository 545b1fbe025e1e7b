"""The example agent economy: a seller of a Wasm-backed service, a buyer, and an agent that
pays for its own compute until it is broke. Each module runs on its own
(`python examples/agents/seller.py --help`); `deparrow demo --agents` runs them together.
Installed as `deparrow.examples`."""
