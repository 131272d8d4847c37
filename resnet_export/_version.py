"""The toolkit's version, in a module that imports nothing (the CLI's --version and the manifests read it)."""

__version__ = "0.1.0"
