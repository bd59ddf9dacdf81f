"""Built-in model plugins, registered like third-party ones (see plugins.manager)."""
