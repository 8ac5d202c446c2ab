"""`pulsesync demo`: one simulated day of a person across phone, desktop and wearable."""
