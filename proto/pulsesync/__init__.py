"""PulseSync: personal context across a person's phone, desktop and wearables."""

__version__ = "0.1.0"
