"""Models, hooks, the logit lens and the extraction job (torch)."""
