"""The benchmark: the harness, the artifacts it builds, its rows, reports, baselines and trend."""


def __getattr__(name: str):
    """``resnet_export.bench.NAME`` as before the layout by stage (the harness was the module ``bench``), for one
    more release, with a DeprecationWarning naming the new module."""
    import importlib
    import warnings

    for module in ("harness", "rows"):
        found = importlib.import_module(f".{module}", __name__)
        if hasattr(found, name):
            warnings.warn(f"resnet_export.bench.{name} moved to resnet_export.bench.{module}.{name}; the old path "
                          "goes in the next release", DeprecationWarning, stacklevel=2)
            return getattr(found, name)
    raise AttributeError(f"module 'resnet_export.bench' has no attribute '{name}'")
