"""Code shared by the API and the worker: settings, Redis keys, events, streams, errors."""
