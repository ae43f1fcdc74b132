"""`--keep-budget` / `--target-size`: how much output error each module adds when quantized, and the plan
with the budget spent.

scores.py and calibrate.py (the error each module adds: from the weights, as `bnb inspect` measures them, or
from activations on text), spend.py (score, choose, the final plan: what the commands call). The budget
itself, the candidates and their exact costs, the knapsack, the choice's record and the checked final plan
are planning, in bnbcli/plan/budget/ (no torch model, no text: headers and scores only). This package stands
beside inspect/ and uses its round trip and activations; the command line calls it (and hands `bnb
footprint` its plans), the pipeline is given the plan it makes.
"""
