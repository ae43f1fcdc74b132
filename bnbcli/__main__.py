"""`python -m bnbcli …` is the `bnb` command, for machines where the console script is not on PATH
(or where another program called `bnb` is)."""

from bnbcli.entry import main

main()
