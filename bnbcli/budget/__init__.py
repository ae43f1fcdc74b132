"""`--keep-budget` / `--target-size`: keep in 16-bit the modules whose quantization costs the model most,
for at most a stated number of extra bytes.

spec.py (what the budget is; imports no torch, the command line parses with it), candidates.py (the modules
and their exact costs), scores.py and calibrate.py (how much error each module adds), choose.py (the
knapsack), choice.py (the record), apply.py (the final plan, checked; ``spend`` is what the commands call).
"""
