"""mezo-replay: a MeZO fine-tune as a few kilobytes of seeded steps, replayed bit for bit on any device."""
__version__ = "0.1.0"
