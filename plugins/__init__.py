"""lookstream's plugin system: hook specs, the plugin manager and the built-in models.

A plugin package implements hooks with :data:`hookimpl` and declares itself in
its ``pyproject.toml``::

    [project.entry-points.lookstream]
    my_models = "my_package.lookstream_plugin"

The module named there defines, for example::

    from plugins import hookimpl

    @hookimpl
    def lookstream_register_encoders(registry):
        registry.add("my-encoder", MyEncoder)

and the config selects it with ``models.encoder = "my-encoder"``.
"""

import pluggy

PROJECT_NAME = "lookstream"

#: Marker for hook implementations (in plugins and in the built-ins alike).
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookimpl"]
