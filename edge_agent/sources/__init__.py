"""Event sources for trying the agent out: simulated apps and emulated wearables."""
