"""Bluetooth LE wearables: GATT parsers, the bridge, and emulated sensors."""
