"""The foundation both services and the CLI stand on: settings, stores, Redis, keys, claims."""
