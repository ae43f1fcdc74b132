"""Planners behind bnbcli.plan: transformers, diffusers and name rules, with their shared records."""
