"""Task sources: each yields :class:`fastmaml.Episode` meta-batches, sampled on the device."""
