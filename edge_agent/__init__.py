"""The PulseSync edge agent: a Tracker SDK for apps, a durable outbox, an uplink, BLE bridge."""
