"""Model-side pieces of the guard: the multifurcation reward model (MRM) and the outcome judge."""
