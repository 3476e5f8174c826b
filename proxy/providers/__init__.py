"""Provider modules: one per wire format (see :mod:`proxy.providers.base`)."""
