"""Optimal transport for word-region alignment: IPOT, Sinkhorn (scaling and log domain), WRA distance."""
