"""Command-line interface: thin Typer commands over the Python API."""
