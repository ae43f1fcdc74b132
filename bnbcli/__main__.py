"""`python -m bnbcli …` is the `bnb` command, for machines where the console script is not on PATH
(or where another program called `bnb` is)."""

from bnbcli.cli.entry import console

if __name__ == "__main__":  # not when the planner's child process (spawn) imports this module
    console()
