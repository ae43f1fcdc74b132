"""The budget as planning: spec.py (what the budget is; imports no torch, the command line parses with it),
candidates.py (the modules and their exact costs), choose.py (the knapsack), choice.py (the record) and
apply.py (the final plan, checked). The scores come from bnbcli/budget/ (which reads weights and runs text).
"""
