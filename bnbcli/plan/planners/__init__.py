"""Planners behind bnbcli.plan.decisions: transformers, diffusers and name rules, with their shared records."""
