"""The `bnb` command line: Typer only, one thin module per verb."""
