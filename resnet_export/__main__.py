"""``python -m resnet_export``."""

from .cli import main

main(prog_name="resnet-export")
